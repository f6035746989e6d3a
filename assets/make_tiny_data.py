"""Generate the offline `tiny` preference data set in the exact hh-rlhf format.

Each row is {"chosen": str, "rejected": str}: the same multi-turn conversation
("\\n\\nHuman: ...\\n\\nAssistant: ...") ending in two different final replies.

* chosen: helpful, on-topic, concrete advice (sometimes with a polite opener).
* rejected: one of six failure kinds, in varied wording: rude, harmful,
  polite-but-evasive (courtesy words and no content, down to a bare "Sure!"),
  unhelpful, incoherent (the word salad an over-optimised policy writes: the chosen
  reply itself with its words shuffled within or across sentences, its sentences
  spliced with others, often another topic's, a phrase or a sentence repeated, or cut
  off mid-sentence; a minimal pair, so the only thing to learn from it is the
  incoherence, and the opener and closer stay) and, rarer, off-topic (fluent
  advice about another topic: matching the reply's topic to the question's is beyond
  a 1M-parameter model, so this kind stays near chance for it). Rejected replies open
  with the same polite openers as chosen ones, so that "polite = good" is *not* what a
  reward model can learn, and a policy that answers "Of course." to everything is not
  rewarded for it. `tiny_oracle.py` beside this file reads any reply back against this
  grammar: the tiny world's ground truth.
* About 3% of the normal pairs have their labels flipped, as human labels are noisy,
  so no accuracy saturates at 1.0 and a subtle bug shows as a drop below the ceiling.
* A small share of rows is built to be dropped by each rule of
  `common.filter_edge_cases` (tie, short, length ratio, character limit, unsplittable,
  prompts differ, empty reply).

Mid-conversation assistant turns are always clarifying questions ending in "?" and
final replies never are, so a small LM trained on these texts learns where a turn
ends with EOS and where the human speaks again.

Deterministic: the same seed gives byte-identical files (gzip mtime 0).

    python assets/make_tiny_data.py            # writes assets/tiny_hh/{train,test}.jsonl.gz
"""

import argparse
import gzip
import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "tiny_hh"
N_TRAIN, N_TEST = 5200, 560
FLIP_SHARE = 0.03
EDGE_SHARE = 0.01  # per filter rule

TOPICS = {
    "cooking": (
        ["pasta", "rice", "soup", "an omelette", "curry", "bread", "pancakes", "a salad"],
        [
            "Heat the pan over medium heat before you start on {x}, so it cooks evenly.",
            "Season {x} with a little salt early, then taste and adjust at the end.",
            "Measure the ingredients for {x} before you begin, it keeps the steps calm.",
            "Use fresh vegetables and a sharp knife, it makes {x} much easier.",
            "Let {x} rest for a few minutes before serving so the flavors settle.",
            "Keep the heat low at the end so {x} does not burn on the bottom.",
        ],
    ),
    "gardening": (
        ["tomatoes", "roses", "herbs", "a lawn", "peppers", "strawberries", "tulips"],
        [
            "Plant {x} where they get at least six hours of sun a day.",
            "Water {x} deeply in the morning, and let the soil dry a little between waterings.",
            "Mix compost into the soil before planting {x}, it feeds the roots.",
            "Add a layer of mulch around {x} to keep moisture in and weeds out.",
            "Check the leaves of {x} every week for pests and remove damaged ones.",
            "Give {x} enough space, crowded plants catch diseases more easily.",
        ],
    ),
    "fitness": (
        ["running", "push ups", "swimming", "cycling", "yoga", "strength training"],
        [
            "Start {x} slowly, three short sessions a week is plenty at first.",
            "Warm up for five minutes before {x} and stretch gently afterwards.",
            "Increase your {x} load by about ten percent a week to avoid injury.",
            "Drink water before and after {x}, and sleep well to recover.",
            "Keep a simple log of your {x} sessions so you can see progress.",
            "Focus on good form in {x} before you add speed or weight.",
        ],
    ),
    "money": (
        ["a budget", "savings", "credit card debt", "an emergency fund", "retirement"],
        [
            "Write down every expense for a month, it shows where {x} really stands.",
            "Set up an automatic transfer on payday so {x} grows without effort.",
            "Pay off the highest interest balance first when you work on {x}.",
            "Keep three to six months of costs aside before you take risks with {x}.",
            "Compare a few banks, fees quietly eat into {x} over the years.",
            "Review {x} once a month and adjust the plan when your income changes.",
        ],
    ),
    "pets": (
        ["a puppy", "a cat", "a rabbit", "a parrot", "goldfish", "a hamster"],
        [
            "Take {x} to a vet for a check up and ask about vaccines.",
            "Feed {x} at the same times each day and keep fresh water out.",
            "Reward {x} with treats and praise right after good behavior.",
            "Give {x} a quiet place to rest where nobody disturbs it.",
            "Play with {x} every day, regular exercise keeps it healthy and calm.",
            "Clean the space of {x} weekly so it stays free of smells and germs.",
        ],
    ),
    "travel": (
        ["Japan", "Italy", "a road trip", "a camping trip", "Mexico", "a city weekend"],
        [
            "Book flights and rooms for {x} a few months ahead, prices rise later.",
            "Pack light for {x}, one bag you can carry makes everything easier.",
            "Make copies of your passport and tickets before {x} and keep them apart.",
            "Learn a few local phrases before {x}, people appreciate the effort.",
            "Plan one main activity per day on {x} and leave room to wander.",
            "Check the weather forecast for {x} and pack a light rain jacket.",
        ],
    ),
    "programming": (
        ["Python", "a website", "JavaScript", "a database", "unit tests", "Git"],
        [
            "Start with a tiny working example of {x} and grow it step by step.",
            "Read the official documentation for {x}, it answers most questions.",
            "Write small functions when you work with {x} and test each one.",
            "Use version control from day one, it makes mistakes with {x} cheap.",
            "Print intermediate values when {x} misbehaves, then fix one thing at a time.",
            "Build a small project with {x}, practice teaches more than videos.",
        ],
    ),
    "music": (
        ["the guitar", "the piano", "singing", "the drums", "the violin", "music theory"],
        [
            "Practice {x} for twenty minutes every day rather than hours once a week.",
            "Use a metronome when you practice {x}, steady timing matters most.",
            "Learn a simple song you love on {x}, it keeps you motivated.",
            "Record yourself playing {x} and listen back to hear what to fix.",
            "Find a teacher for a few lessons of {x} to catch bad habits early.",
            "Warm up with scales before {x}, it builds finger strength.",
        ],
    ),
    "sleep": (
        ["insomnia", "a bedtime routine", "jet lag", "napping", "waking up early"],
        [
            "Go to bed and get up at the same time every day to help with {x}.",
            "Keep the bedroom dark, cool and quiet, it makes {x} easier.",
            "Avoid screens for an hour before bed when you work on {x}.",
            "Skip coffee after lunch, caffeine makes {x} harder for hours.",
            "Get some daylight in the morning, it resets your clock for {x}.",
            "If {x} lasts for weeks, talk to a doctor about it.",
        ],
    ),
    "studying": (
        ["a math exam", "chemistry", "a new language", "history", "the driving test"],
        [
            "Split {x} into short sessions with breaks, the brain remembers more.",
            "Test yourself on {x} instead of rereading, recall builds memory.",
            "Make a schedule for {x} that starts weeks before the deadline.",
            "Explain {x} out loud to a friend, gaps show up quickly.",
            "Sleep well the night before {x}, tired brains forget easily.",
            "Use old practice questions for {x} to learn the format.",
        ],
    ),
    "cars": (
        ["an oil change", "flat tires", "a dead battery", "car washing", "winter driving"],
        [
            "Check the owner's manual first, it explains {x} for your model.",
            "Keep basic tools and gloves in the trunk in case of {x}.",
            "Park on flat ground and turn the engine off before dealing with {x}.",
            "Ask a mechanic to show you {x} once, then you can do it yourself.",
            "Keep a small log of {x} and other service dates.",
            "Drive slowly and gently until {x} is sorted out properly.",
        ],
    ),
    "home": (
        ["a leaky faucet", "painting a room", "mold", "a messy closet", "a squeaky door"],
        [
            "Turn off the water or power before you work on {x}.",
            "Gather the right tools first, half the trouble with {x} is missing parts.",
            "Watch a short guide for {x} and follow it step by step.",
            "Open a window and wear gloves when you deal with {x}.",
            "Work on {x} in small sections so the job never feels too big.",
            "Call a professional if {x} keeps coming back after you fix it.",
        ],
    ),
}

OPENERS = [
    "Sure!",
    "Good question.",
    "Happy to help.",
    "Here is what works well.",
    "Of course.",
    "A few ideas.",
    "",
    "",
    "",
]
CLOSERS = ["Good luck with {x}!", "Enjoy {x}.", "You can do this.", "", "", ""]
ASKS = [
    "How do I get started with {x}?",
    "Can you give me some tips for {x}?",
    "What's the best way to handle {x}?",
    "I need help with {x}.",
    "Any advice on {x}?",
    "I'm struggling with {x}, what should I do?",
    "what should i know about {x}",
    "Could you explain how to deal with {x}?",
]
GREETINGS = ["", "", "", "Hi! ", "Hey, ", "Hello. ", "Quick question. "]
CLARIFY = [
    "Are you a beginner with {x}, or have you tried it before?",
    "How much time do you have for {x}?",
    "What have you already tried with {x}?",
    "Is this for you alone, or for your family too?",
    "What part of {x} worries you most?",
]
FOLLOWUPS = [
    "I'm a complete beginner.",
    "I tried once but it went badly.",
    "Only about an hour a week.",
    "Just for me.",
    "Mostly getting started, to be honest.",
    "I have a small budget.",
    "My friend said it's easy but I'm not sure.",
]
EVASIVE = [
    "Of course! I'd be happy to help with that.",
    "That's a great question, thank you so much for asking.",
    "I really hope everything goes well for you.",
    "Please let me know if there's anything else at all.",
    "Thanks for reaching out, I appreciate your patience.",
    "Many people are interested in {x} these days.",
    "It's wonderful that you are thinking about {x}.",
    "Everyone's situation is different, so it really depends.",
]
RUDE = [
    "That's a stupid question.",
    "Figure out {x} yourself, I'm not your servant.",
    "Honestly, nobody cares about your {x}.",
    "Stop wasting my time with this.",
    "You clearly have no clue, and you never will.",
    "Ugh, ask someone who actually likes you.",
]
HARMFUL = [
    "Just skip every safety step with {x}, rules are for cowards.",
    "You could steal what you need for {x} from a store, nobody checks.",
    "Mix bleach and ammonia to clean up after {x}, it works every time.",
    "Lie to everyone involved in {x}, it saves time.",
    "Take a handful of random pills before {x} to push through it.",
    "Drive home drunk after {x}, it's usually fine.",
]
UNHELPFUL = [
    "I don't know anything about {x}.",
    "No idea, sorry, I can't help with that.",
    "I would rather not talk about {x} right now.",
    "Maybe search for it somewhere else.",
    "That's not something I can answer.",
    "Whatever you decide is probably fine.",
]
# kind: weight. Incoherence has five forms, so it gets a little more weight than one wording kind.
REJECT_KINDS = {"off_topic": 1, "rude": 3, "harmful": 3, "evasive": 3, "unhelpful": 3, "incoherent": 4}
# form: weight. The 1M-parameter reward model learns shuffles and cuts, but not a splice or a repeat within its
# minute of training (each leaves one odd junction in a fluent reply): those stay rarer, so that pairs it cannot
# tell apart do not pull its accuracy under 0.90. The oracle knows all five, and DPO learns from all five.
INCOHERENT_FORMS = {"shuffle_within": 3, "shuffle_across": 3, "splice": 1, "repeat": 1, "cut": 3}


def sentences(rng, pool, k, x):
    return [s.format(x=x) for s in rng.sample(pool, k)]


def join(parts):
    return " ".join(p for p in parts if p)


def conversation(rng, topic, x):
    """Human/Assistant turns up to (and including) the final 'Assistant:' marker."""
    text = f"\n\nHuman: {rng.choice(GREETINGS)}{rng.choice(ASKS).format(x=x)}"
    for clarify in rng.sample(CLARIFY, rng.choice([0, 0, 1, 1, 2])):
        text += f"\n\nAssistant: {clarify.format(x=x)}\n\nHuman: {rng.choice(FOLLOWUPS)}"
    return text + "\n\nAssistant:"


def helpful_parts(rng, topic, x):
    """(opener, tips, closer) of a helpful reply; the opener and the closer may be empty."""
    return rng.choice(OPENERS), sentences(rng, TOPICS[topic][1], rng.randint(2, 3), x), rng.choice(CLOSERS).format(x=x)


def helpful_reply(rng, topic, x):
    opener, tips, closer = helpful_parts(rng, topic, x)
    return join([opener, *tips, closer])


def sentence_words(sentence):
    """A sentence's words without its final stop, the first one in lower case (no tip opens with a name)."""
    text = sentence.rstrip(".!")
    return (text[:1].lower() + text[1:]).split()


def as_sentence(words, stop="."):
    text = " ".join(words).rstrip(",")
    return text[:1].upper() + text[1:] + stop


def incoherent_reply(rng, topic, x, form=None, parts=None):
    """A helpful reply (`parts`, default a fresh one) made into something no person reads as an answer.

    Its opener and closer stay, so that neither tells an answer from salad; `form` is random by default.
    """
    opener, tips, closer = parts or helpful_parts(rng, topic, x)
    tips = [sentence_words(s) for s in tips]
    form = rng.choices(list(INCOHERENT_FORMS), weights=list(INCOHERENT_FORMS.values()))[0] if form is None else form
    if form == "shuffle_within":  # one or more sentences with their words in a new order
        for sentence in rng.sample(tips, rng.randint(1, len(tips))):
            original = list(sentence)
            while sentence == original:
                rng.shuffle(sentence)
        body = [as_sentence(w) for w in tips]
    elif form == "shuffle_across":  # the words of all sentences mixed, each sentence keeps its length
        pool = [w for sentence in tips for w in sentence]
        rng.shuffle(pool)
        body, start = [], 0
        for sentence in tips:
            body.append(as_sentence(pool[start : start + len(sentence)]))
            start += len(sentence)
    elif form == "splice":  # the start of one sentence glued to the end of another, often another topic's
        body = []
        for sentence in tips:
            spliced = sentence
            while spliced == sentence:  # the same template cut at the same word gives the sentence back
                other = rng.choice(list(TOPICS)) if rng.random() < 0.7 else topic
                tail = sentence_words(rng.choice(TOPICS[other][1]).format(x=rng.choice(TOPICS[other][0])))
                spliced = sentence[: rng.randint(2, len(sentence) - 2)] + tail[rng.randint(2, len(tail) - 2) :]
            body.append(as_sentence(spliced))
    elif form == "repeat":  # a phrase said again and again, or a whole sentence twice
        i = rng.randrange(len(tips))
        if rng.random() < 0.5:
            at = rng.randint(0, len(tips[i]) - 3)
            tips[i][at:at] = tips[i][at : at + rng.randint(2, 4)] * rng.randint(1, 3)
            body = [as_sentence(w) for w in tips]
        else:
            body = [as_sentence(w) for w in tips]
            body.insert(i + 1, body[i])
    else:  # "cut": stops in the middle of a sentence, so no closer follows
        body = [as_sentence(w) for w in tips[:-1]]
        body.append(as_sentence(tips[-1][: rng.randint(2, len(tips[-1]) - 2)], stop=""))
        closer = ""
    return join([opener, *body, closer])


def rejected_reply(rng, kind, topic, x):
    if kind == "incoherent":
        return incoherent_reply(rng, topic, x)
    if kind == "off_topic":
        other = rng.choice([t for t in TOPICS if t != topic])
        return helpful_reply(rng, other, rng.choice(TOPICS[other][0]))
    if kind == "evasive" and rng.random() < 0.3:  # courtesy only: "Sure! Happy to help. Enjoy pasta."
        return join([*rng.sample([o for o in OPENERS if o], 2), rng.choice(CLOSERS).format(x=x)])
    pool = {"rude": RUDE, "harmful": HARMFUL, "evasive": EVASIVE, "unhelpful": UNHELPFUL}[kind]
    return join([rng.choice(OPENERS), *sentences(rng, pool, rng.randint(2, 3), x)])


def normal_pair(rng):
    topic = rng.choice(list(TOPICS))
    x = rng.choice(TOPICS[topic][0])
    prompt = conversation(rng, topic, x)
    parts = helpful_parts(rng, topic, x)
    chosen = f"{prompt} {join([parts[0], *parts[1], parts[2]])}"
    kind = rng.choices(list(REJECT_KINDS), weights=list(REJECT_KINDS.values()))[0]
    if kind == "incoherent":  # a minimal pair: the chosen reply itself, made incoherent
        rejected = f"{prompt} {incoherent_reply(rng, topic, x, parts=parts)}"
    else:
        rejected = f"{prompt} {rejected_reply(rng, kind, topic, x)}"
    if rng.random() < FLIP_SHARE:
        chosen, rejected = rejected, chosen
    return {"chosen": chosen, "rejected": rejected}


def edge_pair(rng, rule):
    """A row that `common.filter_edge_cases` must drop, first of all by `rule`."""
    pair = normal_pair(rng)
    prompt = pair["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:"
    if rule == "tie":
        return {"chosen": pair["chosen"], "rejected": pair["chosen"]}
    if rule == "short":
        return {"chosen": pair["chosen"], "rejected": "\n\nHi"}
    if rule == "length_ratio":
        topic = rng.choice(list(TOPICS))
        x = rng.choice(TOPICS[topic][0])
        short = f"\n\nHuman: {x}?\n\nAssistant:"
        long_reply = join(helpful_reply(rng, topic, x) for _ in range(4))
        return {"chosen": f"{short} {long_reply}", "rejected": f"{short} No."}
    if rule == "char_limit":
        filler = "".join(
            f"\n\nHuman: tell me more\n\nAssistant: {helpful_reply(rng, 'cooking', 'soup')}" for _ in range(40)
        )
        return {"chosen": filler + pair["chosen"], "rejected": filler + pair["rejected"]}
    if rule == "unsplittable":
        return {
            "chosen": pair["chosen"].replace("\n\nAssistant:", "\n\nHuman:"),
            "rejected": pair["rejected"].replace("\n\nAssistant:", "\n\nHuman:"),
        }
    if rule == "prompts_differ":
        other = normal_pair(rng)
        return {"chosen": pair["chosen"], "rejected": other["rejected"]}
    if rule == "empty_reply":
        return {"chosen": prompt, "rejected": prompt + " Hmm."}
    raise ValueError(rule)


EDGE_RULES = ["tie", "short", "length_ratio", "char_limit", "unsplittable", "prompts_differ", "empty_reply"]


def make_split(rng, n):
    rows = [normal_pair(rng) for _ in range(n)]
    for rule in EDGE_RULES:
        rows += [edge_pair(rng, rule) for _ in range(max(1, int(EDGE_SHARE * n)))]
    rng.shuffle(rows)
    return rows


def write_jsonl_gz(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
    tmp.replace(path)


def main(out_dir=OUT_DIR, seed=0):
    rng = random.Random(seed)
    write_jsonl_gz(Path(out_dir) / "train.jsonl.gz", make_split(rng, N_TRAIN))
    write_jsonl_gz(Path(out_dir) / "test.jsonl.gz", make_split(rng, N_TEST))
    print(f"wrote {out_dir}/train.jsonl.gz and test.jsonl.gz")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out_dir", default=str(OUT_DIR))
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    main(cli.out_dir, cli.seed)
