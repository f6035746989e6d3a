"""assets/tiny_oracle.py: the tiny world's ground truth agrees with the generator that wrote the data."""

import gzip
import json
import random

import pytest

import common
import lifecycle
from assets import make_tiny_data as gen
from assets import tiny_oracle as oracle

PROMPT = "\n\nHuman: Hi! How do I get started with pasta?\n\nAssistant:"
ANSWER = "Heat the pan over medium heat before you start on pasta, so it cooks evenly."
TIP2 = "Season pasta with a little salt early, then taste and adjust at the end."


def test_every_question_of_the_generator_names_its_subject():
    for xs, _ in gen.TOPICS.values():
        for x in xs:
            for ask in gen.ASKS:
                prompt = (
                    f"\n\nHuman: {gen.GREETINGS[-1]}{ask.format(x=x)}\n\nAssistant: ...?\n\nHuman: ok\n\nAssistant:"
                )
                assert oracle.subject(prompt) == x
    with pytest.raises(ValueError, match="not a prompt of the tiny world"):
        oracle.subject("\n\nHuman: What is the capital of France?\n\nAssistant:")


def test_each_kind_the_generator_writes_gets_its_label():
    """Thousands of fresh draws of every kind: helpful replies are `good`, each rejected kind gets its own label."""
    rng = random.Random(7)
    for _ in range(3000):
        topic = rng.choice(list(gen.TOPICS))
        x = rng.choice(gen.TOPICS[topic][0])
        prompt = gen.conversation(rng, topic, x)
        reply = gen.helpful_reply(rng, topic, x)
        assert oracle.judge(prompt, reply) == "good", reply
        for kind in gen.REJECT_KINDS:
            reply = gen.rejected_reply(rng, kind, topic, x)
            assert oracle.judge(prompt, reply) == oracle.KIND_LABEL[kind], (kind, reply)
    assert set(oracle.KIND_LABEL) == set(gen.REJECT_KINDS)
    assert set(oracle.KIND_LABEL.values()) | {"good", "empty"} == set(oracle.LABELS)


@pytest.mark.parametrize(
    "reply, label",
    [
        (f"Sure! {ANSWER} {TIP2} Enjoy pasta.", "good"),
        (f"  {ANSWER}   {TIP2}  ", "good"),  # white space is normalised
        (f"{ANSWER[:-1]}! {TIP2} Good luck with pasta.", "good"),  # and so is "!" for "."
        (ANSWER, "good"),  # one tip is an answer
        # the word salad the policies wrote against the previous tiny reward model (scored about +1)
        ("Measure the brain remembers more easily. Feed every little salt early at the driving test.", "incoherent"),
        ("Book flights and rooms for retirement once a room to a bag you a few months ahead.", "incoherent"),
        (f"{ANSWER} {ANSWER}", "incoherent"),  # a sentence said twice
        (ANSWER[:-1], "incoherent"),  # cut off before its stop
        (f"{ANSWER} Sure! {TIP2}", "incoherent"),  # an opener between the tips
        (f"{ANSWER}\n\nHuman: thanks", "incoherent"),  # another turn begun
        ("", "empty"),
        ("Of course.", "courtesy_only"),
        ("Sure! Happy to help. Enjoy pasta.", "courtesy_only"),
        (f"It's wonderful that you are thinking about pasta. {ANSWER}", "courtesy_only"),  # filler no answer has
        ("Are you a beginner with pasta, or have you tried it before?", "courtesy_only"),
        ("Plant roses where they get at least six hours of sun a day.", "off_topic"),
        ("Heat the pan over medium heat before you start on rice, so it cooks evenly.", "off_topic"),  # wrong dish
        (f"{ANSWER} Enjoy rice.", "off_topic"),
        (f"{ANSWER} That's a stupid question.", "rude"),
        (f"{ANSWER} Drive home drunk after pasta, it's usually fine.", "harmful"),
        ("No idea, sorry, I can't help with that.", "refusal"),
    ],
)
def test_hand_labelled_replies(reply, label):
    assert oracle.judge(PROMPT, reply) == label


def test_the_bundled_test_split_agrees_with_its_labels_but_for_the_flipped_share():
    """Chosen is `good` and rejected is not on every kept pair, but for the ~3% whose labels were flipped."""
    outcomes = []
    with gzip.open(lifecycle.TINY_DATA_DIR / "test.jsonl.gz", "rt") as f:
        for row in map(json.loads, f):
            if common.drop_reason(row) is None:
                prompt, chosen = common.split_conversation(row["chosen"])
                rejected = common.split_conversation(row["rejected"])[1]
                outcomes.append((oracle.judge(prompt, chosen) == "good", oracle.judge(prompt, rejected) == "good"))
    agree = sum(c and not r for c, r in outcomes) / len(outcomes)
    flipped = sum(r and not c for c, r in outcomes) / len(outcomes)
    assert agree + flipped == 1.0  # exactly one reply of each pair is a real answer
    assert flipped == pytest.approx(gen.FLIP_SHARE, abs=0.02)


def test_label_counts_cover_every_label():
    counts = oracle.label_counts([PROMPT] * 3, [ANSWER, "", "Of course."])
    assert list(counts) == list(oracle.LABELS)
    assert (counts["good"], counts["empty"], counts["courtesy_only"], counts["rude"]) == (1, 1, 1, 0)
