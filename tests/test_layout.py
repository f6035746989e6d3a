"""The project's layout: the modules' imports form no circle, common.py holds the RLHF core only, and the README
and docs/ stay short and their links lead somewhere."""

import ast
import re

import pytest
from conftest import REPO

SHARED = ("common", "lifecycle", "reporting")  # the modules the scripts share
# What left common.py (issue 28): the run's lifecycle and its reporting. None of it may come back.
LIFECYCLE_AND_REPORTING = (
    "parse_args", "run", "save_checkpoint", "load_checkpoint", "remove_leftovers", "damage", "atomic_write_json",
    "sync_snapshots", "MetricsLogger", "plot_metrics", "start_tracking", "model_card", "push_folder", "check_push",
)  # fmt: skip


def project_modules():
    return {p.stem: p for p in REPO.glob("*.py")}


def imports(path, modules):
    """The project modules `path` imports, at any depth of its code (a function's lazy import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(modules) - {path.stem}


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_two_modules_import_each_other_in_a_circle():
    modules = project_modules()
    graph = {name: imports(path, modules) for name, path in modules.items()}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"
    assert graph["lifecycle"] == set() and graph["common"] == {"lifecycle"}
    assert graph["reporting"] <= {"lifecycle", "common"}


def test_common_holds_the_rlhf_core_and_each_shared_module_says_what_it_holds():
    tree = ast.parse((REPO / "common.py").read_text())
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert not defined & set(LIFECYCLE_AND_REPORTING), sorted(defined & set(LIFECYCLE_AND_REPORTING))
    assert {"forward", "gather_logprobs", "generate_responses", "get_reward", "masked_whiten"} <= defined
    for name in SHARED:
        doc = ast.get_docstring(ast.parse((REPO / f"{name}.py").read_text()))
        assert doc and len(doc.split("\n\n")[0]) > 40, f"{name}.py needs a docstring saying what it holds"


def markdown_files():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_readme_is_short_and_its_lines_are_too():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250; the reference belongs in docs/)"
    long = [i for i, line in enumerate(lines, 1) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_and_named_docs_path_exists(page):
    text = page.read_text()
    text_without_code = re.sub(r"```.*?```", "", text, flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text_without_code)  # [text](target) and ![alt](target)
    missing = []
    for target in targets:
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address, or an anchor in the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    if page.name == "README.md":  # every docs/ path the README names, linked or not
        for named in set(re.findall(r"\bdocs/[\w./-]+\w", text)):
            if not (REPO / named).exists():
                missing.append(named)
    assert not missing, f"{page.relative_to(REPO)} points at what does not exist: {missing}"
    long = [i for i, line in enumerate(text.splitlines(), 1) if len(line) > 120]
    assert not long, f"{page.relative_to(REPO)}: lines over 120 characters: {long}"


def test_the_readme_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
