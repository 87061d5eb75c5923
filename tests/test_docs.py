"""The documentation is tested like code: its code blocks run, and its figures are measured.

Every fenced block of the README and of ``docs/`` declares its language:

- ``python`` blocks run, those of a page in order as one script, in a fresh process and an empty
  folder; ``bash`` blocks run too, before the page's Python (their files are its input);
- ``console`` blocks show commands that take minutes (installing, benchmarks, ``make``): every
  command in them is checked to exist as written (a Makefile target, a script and its flags, a
  command line that ``inertia``'s parser accepts) without running it;
- ``text`` and ``bibtex`` blocks are not code; a ``text title="Output"`` block shows what the
  page's Python prints, and must appear in its output as written.

Every figure of the prose (a number in MiB, GiB, ms, x or %, or in scientific notation) must be
found, to its shown precision, in a results file that the page links to and whose command (its
script, or ``inertia experiment NAME``) the page names: the committed files of
``benchmarks/results/`` and ``docs/experiments/``. Settings and constants are written as inline
code (a tolerance of `1e-5` in backticks), which this check skips. The site itself is built
by ``make docs`` in strict mode.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inertia import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = (DOCS / "experiments", DOCS / "results", DOCS / "reference")
WRITTEN = (p for p in DOCS.rglob("*.md") if not any(p.is_relative_to(g) for g in GENERATED))
PAGES = [ROOT / "README.md", *sorted(WRITTEN)]
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<info>[^\n`]*)\n(?P<body>.*?)"
    r"^(?P=indent)(?P=fence)[ \t]*$",
    re.M | re.S,
)
OUTPUT = 'text title="Output"'
LANGUAGES = {"python", "bash", "console", "text", "bibtex", OUTPUT}


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of ``page``, indentation removed; the language of a
    block of output is `OUTPUT`."""
    found = []
    for m in FENCE.finditer(page.read_text()):
        indent = len(m["indent"])
        code = "".join(line[indent:] for line in m["body"].splitlines(keepends=True))
        info = m["info"].strip()
        found.append((info if info == OUTPUT else info.split(" ")[0], code))
    return found


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_block_declares_a_known_language(page: Path) -> None:
    unknown = [lang or "(none)" for lang, _ in blocks(page) if lang not in LANGUAGES]
    assert not unknown, f"{page_id(page)}: blocks in {unknown}; use one of {sorted(LANGUAGES)}"


RUN = [p for p in PAGES if any(lang in ("python", "bash") for lang, _ in blocks(p))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("page", RUN, ids=page_id)
def test_code_blocks_run(page: Path, tmp_path: Path) -> None:
    """The page's bash blocks, then its Python blocks as one script, in an empty folder.

    A page that calls ``init_process_group`` runs in a one-process ``torchrun`` environment
    (``RANK``, ``WORLD_SIZE``...), so that its distributed recipe runs as written.
    """
    found = blocks(page)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if any("init_process_group" in code for _, code in found):
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))  # fmt: skip
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # this worker's share
    shell = "".join(code for lang, code in found if lang == "bash")
    python = "\n".join(code for lang, code in found if lang == "python")
    for command, code in ((["bash", "-euo", "pipefail"], shell), ([sys.executable], python)):
        if not code:
            continue
        script = tmp_path / ("page.sh" if command[0] == "bash" else "page.py")
        script.write_text(code)
        done = subprocess.run([*command, str(script)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, (
            f"{page_id(page)}: its {script.suffix} blocks failed\n{code}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-6000:]}"
        )
        if command[0] != "bash":
            for shown in (code for lang, code in found if lang == OUTPUT):
                assert shown in done.stdout, (
                    f"{page_id(page)} shows\n{shown}\nbut printed\n{done.stdout}"
                )


def test_readme_links_resolve() -> None:
    """The README is read on the repository's front page, outside the site: its links are files."""
    for target in LINK.findall((ROOT / "README.md").read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


MAKE_TARGETS = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
CONSOLE = [p for p in PAGES if any(lang == "console" for lang, _ in blocks(p))]


def check_command(words: list[str]) -> str | None:
    """Why ``words`` does not name an existing command as written, or None."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    head, *rest = words
    if head == "make":
        missing = [t for t in rest if t not in MAKE_TARGETS]
        return f"no Makefile target {missing}" if missing else None
    if head in ("python", "torchrun") and "-m" in rest:  # python or torchrun -m inertia
        at = rest.index("-m")
        if rest[at + 1] != "inertia":
            return f"unknown module {rest[at + 1]!r}"
        head, rest = "inertia", rest[at + 2 :]
    if head == "inertia":
        try:
            cli.parser().parse_args(rest)
        except SystemExit:
            return "inertia's parser refuses it"
        return None
    if head in ("python", "torchrun"):
        scripts = [w for w in rest if w.endswith(".py")]
        if len(scripts) != 1 or not (ROOT / scripts[0]).is_file():
            return f"no script {scripts}"
        source = (ROOT / scripts[0]).read_text()
        flags = [w.split("=")[0] for w in rest[rest.index(scripts[0]) + 1 :] if w.startswith("--")]
        unknown = [f for f in flags if f'"{f}"' not in source]
        return f"{scripts[0]} has no flags {unknown}" if unknown else None
    if head == "pip":
        return None if rest[:1] == ["install"] else "only pip install"
    return f"unknown command {head!r}"


@pytest.mark.parametrize("page", CONSOLE, ids=page_id)
def test_console_commands_exist(page: Path) -> None:
    for lang, code in blocks(page):
        if lang != "console":
            continue
        for line in code.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                why = check_command(shlex.split(line))
                assert why is None, f"{page_id(page)}: `{line}`: {why}"


def test_a_wrong_command_is_caught() -> None:
    assert check_command(["make", "nonsense"]) is not None
    assert check_command(["inertia", "train", "--epochs", "1", "--no-such-flag"]) is not None
    assert check_command(["python", "benchmarks/true_peak.py", "--no-such-flag"]) is not None
    assert check_command(["python", "benchmarks/true_peak.py"]) is None
    assert check_command(["inertia", "bench", "--quick", "--out", "runs/bench"]) is None
    assert check_command(["torchrun", "--nproc-per-node", "2", "-m", "inertia", "train"]) is None
    assert check_command(["torchrun", "-m", "inertia", "train", "--wrong"]) is not None


# A figure: a number with a unit, or in scientific notation; not inside code.
FIGURE = re.compile(r"(?<![\w.,/-])(\d[\d,]*(?:\.\d+)?)(?:\s?(MiB|GiB|ms|x|%)|(e[-+]?\d+))(?![\w])")
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?")
LINK = re.compile(r"\]\(([^)#\s]+)")


def sources(page: Path, text: str) -> list[Path]:
    """The committed results files that ``page``, whose text is ``text``, links to."""
    found = []
    for target in LINK.findall(text):
        path = (page.parent / target).resolve()
        if path.is_relative_to(DOCS / "results"):  # the site's page of benchmarks/results/NAME.md
            path = ROOT / "benchmarks" / "results" / path.name
        if path == DOCS / "experiments.md":
            found += sorted((DOCS / "experiments").glob("*.md"))
        elif path.suffix in (".md", ".json", ".csv") and (
            path.is_relative_to(ROOT / "benchmarks" / "results")
            or path.is_relative_to(DOCS / "experiments")
        ):
            found.append(path)
    if page == DOCS / "experiments.md":
        found += sorted((DOCS / "experiments").glob("*.md"))
    return found


def prose(text: str) -> str:
    """``text`` without fenced blocks, inline code, link targets and HTML comments."""
    text = FENCE.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"(`+).+?\1", "", text, flags=re.S)
    return re.sub(r"\]\([^)]*\)", "]", text)


def matches(shown: str, measured: list[float]) -> bool:
    """Whether some measured value, rounded as ``shown`` is, equals it."""
    mantissa, _, exponent = shown.replace(",", "").partition("e")
    decimals = len(mantissa.partition(".")[2])
    value = float(shown.replace(",", ""))
    if exponent:
        return any(float(f"{m:.{decimals}e}") == value for m in measured)
    return any(math.isclose(round(m, decimals), value, abs_tol=1e-12) for m in measured)


def producer(source: Path) -> str:
    """The command that wrote a results file, as the page must name it: its script, or
    ``inertia experiment NAME``."""
    found = re.search(r"(?:Produced by|Command:) `([^`]*)`", source.read_text())
    assert found, f"{source} does not say which command produced it"
    words = found[1].split()
    return next((w for w in words if w.endswith(".py")), " ".join(words[:3]))


def unmeasured(page: Path, text: str | None = None) -> list[str]:
    """The figures of ``page`` (or of ``text`` in its place) that no linked results file whose
    command the page names holds."""
    text = page.read_text() if text is None else text
    measured = [
        [float(n.replace(",", "")) for n in NUMBER.findall(src.read_text())]
        for src in dict.fromkeys(sources(page, text))
        if producer(src) in text
    ]
    figures = FIGURE.finditer(prose(text))
    return [f[0] for f in figures if not any(matches(f[1] + (f[3] or ""), m) for m in measured)]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_figures_come_from_linked_results(page: Path) -> None:
    missing = unmeasured(page)
    linked = {str(s.relative_to(ROOT)): producer(s) for s in sources(page, page.read_text())}
    assert not missing, (
        f"{page_id(page)}: figures found in no results file that the page both links to and "
        f"names the command of ({linked}): {missing}. Quote the file, link it and name its "
        "command, or write a setting as code."
    )


def test_an_invented_figure_is_caught() -> None:
    page = DOCS / "benchmarks.md"
    text = page.read_text()
    assert not unmeasured(page, text)
    for invented in ("12,345.6 MiB", "0.123x", "4.56e-7", "12.3%"):
        assert unmeasured(page, f"{text}\n\nWe measured {invented}.\n") == [invented]
    assert not unmeasured(page, f"{text}\n\nA tolerance of `4.56e-7`.\n")
    unnamed = text.replace("benchmarks/true_peak.py", "the benchmark")
    assert "1,220.2 MiB" in unmeasured(page, unnamed)  # its file's command is no longer named
