"""The offline demo, end to end: the commands `make demo` runs, declared once here.

    python tools/demo.py [--workspace demo-out] [--saevctl PATH]   # run them (what `make demo` does)
    python tools/demo.py --readme                                   # run them afresh, rewrite README's transcript

Each step is one saevctl command run in the workspace; a step whose inputs are unchanged says so and keeps its
output, so a second run takes seconds. `features pick` chooses the feature the later steps show (by its stated
rule), with an image where it fires and one where it does not. tests/test_readme.py checks README's transcript
against these steps and today's CLI.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- demo transcript: begin (tools/demo.py --readme) -->", "<!-- demo transcript: end -->"

# {feature}, {present} and {absent} come from `features pick --plain --limit 1`, run before the steps that use them.
STEPS = (
    "extract --model demo --images demo --masks demo --layers 6 --compute bfloat16 --out store",
    "train --store store --layer 6 --activation topk --k 32 --width 18x --batch-size 2048 --lr 1e-3 --dtype bfloat16 "
    "--out sae",
    "mine --sae sae --store store --index index.duckdb --max-per-source 3 --compute bfloat16",
    "features label --level patch",
    "features pick --limit 3",
    "features top --id {feature}",
    "features top --id 6909",
    "heads train --task segment --images demo:128 --masks demo --out heads/shapes",
    "eval all --images demo:64 --masks demo --head heads/shapes --recon-max-images 128 --n-boot 500 --vision "
    "--vision-max-images 512 --baselines --baseline-kinds untrained,pca",
    "report --out report --max-features 100",
    "probe --image {present} --head saliency --clamp {feature}=-2x --out probe-present.png",
    "probe --image {absent} --head saliency --clamp {feature}=-2x --out probe-absent.png",
    "eval card",
)
PICK = "features pick --plain --limit 1"


def command(step: str, picked: dict[str, str], workspace: Path) -> list[str]:
    """A step's arguments with the picked feature and images filled in (train resumes a run already there)."""
    args = [a.format(**picked) for a in shlex.split(step)]
    if args[0] == "train" and (workspace / "sae").is_dir():
        args.append("--resume")
    return args


def shown(args: list[str]) -> str:
    return "$ saevctl " + " ".join(shlex.quote(a) for a in args)


def pick(saevctl: str, workspace: Path) -> dict[str, str]:
    out = subprocess.run([saevctl, *shlex.split(PICK)], cwd=workspace, check=True, capture_output=True, text=True)
    line = out.stdout.strip().splitlines()
    if not line:
        sys.exit("features pick found no feature that passes its rule; see `saevctl features pick` for why")
    feature, present, absent = [*line[0].split("\t"), "", ""][:3]
    return {"feature": feature, "present": present, "absent": absent or present}


def run(saevctl: str, workspace: Path, capture: bool) -> list[tuple[str, str]]:
    """Run every step in `workspace`; with `capture`, return (command, output) pairs instead of printing live."""
    workspace.mkdir(parents=True, exist_ok=True)
    picked: dict[str, str] = {}
    transcript = []
    for step in STEPS:
        if "{" in step and not picked:
            picked = pick(saevctl, workspace)
        args = command(step, picked, workspace)
        print(shown(args), flush=True)
        t0, cpu0 = time.perf_counter(), _cpu()
        res = subprocess.run([saevctl, *args], cwd=workspace, capture_output=capture, text=True)
        if res.returncode:
            sys.stdout.write((res.stdout or "") + (res.stderr or ""))
            sys.exit(f"demo step failed (exit {res.returncode}): {shown(args)}")
        took = f"[{time.perf_counter() - t0:.1f} s, {_cpu() - cpu0:.1f} s of CPU]"
        if capture:  # the transcript keeps the output; the timing goes to stderr, for docs/performance.md
            transcript.append((shown(args), res.stdout))
            print(took, file=sys.stderr, flush=True)
        else:
            print(took + "\n", flush=True)
    return transcript


def _cpu() -> float:
    """CPU seconds (user + system) of the finished steps: a figure the machine's other load barely changes."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _tidy(text: str, workspace: Path) -> str:
    """Paths as a reader's run prints them: the workspace as demo-out/, the cache as ~/.cache/saevctl."""
    from saevctl import layout

    # the cache first: a workspace under the same folder (/tmp) would otherwise cut the cache's path apart
    text = text.replace(str(layout.cache_dpath()), "~/.cache/saevctl").replace(str(workspace.parent) + "/", "")
    return "\n".join(line.rstrip() for line in text.splitlines())


def _short(text: str, head: int = 16, tail: int = 3) -> str:
    """A long output (a 25-row table) as its first and last lines."""
    lines = text.splitlines()
    return text if len(lines) <= head + tail + 6 else "\n".join([*lines[:head], "   ...", *lines[-tail:]])


def write_readme(transcript: list[tuple[str, str]], workspace: Path) -> None:
    body = "\n\n".join(f"{cmd}\n{_short(_tidy(out, workspace).strip(chr(10)))}" for cmd, out in transcript)
    block = f"{BEGIN}\n```console\n{body}\n```\n{END}"
    text = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"README.md has no transcript markers ({BEGIN} ... {END})")
    README.write_text(pattern.sub(lambda _: block, text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=None, help="default demo-out (with --readme: a fresh temporary "
                   "folder named demo-out; a given one must not exist yet)")
    p.add_argument("--saevctl", default=shutil.which("saevctl") or str(Path(sys.executable).parent / "saevctl"))
    p.add_argument("--readme", action="store_true", help="run in a fresh workspace and rewrite README's transcript")
    a = p.parse_args()
    if not a.readme:
        workspace = a.workspace or Path("demo-out")
        run(a.saevctl, workspace, capture=False)
        # the interactive explorer blocks, so the demo only says how to start it
        print(f"Explore it in a browser: cd {workspace} && {a.saevctl} serve   (http://127.0.0.1:8000, this "
              "machine only; Ctrl-C stops it)")
        return
    os.environ.update({"COLUMNS": "100", "TERMINAL_WIDTH": "100", "NO_COLOR": "1"})
    if a.workspace is not None:  # a first run is what a reader gets: the workspace must be new
        if a.workspace.exists():
            sys.exit(f"--workspace {a.workspace} exists; --readme records a first run, in a new folder")
        write_readme(run(a.saevctl, a.workspace.resolve(), capture=True), a.workspace.resolve())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            workspace = Path(tmp) / "demo-out"
            write_readme(run(a.saevctl, workspace, capture=True), workspace)
    print(f"rewrote the transcript in {README}")


if __name__ == "__main__":
    main()
