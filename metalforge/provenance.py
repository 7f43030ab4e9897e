"""Where a benchmark's figures come from: the command and the revision of this checkout that
measured them, which the section a script writes names."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def revision(rev: str = "HEAD") -> str:
    """`rev`'s short commit ("HEAD": this checkout's, "+ changes" when files other than Markdown
    differ from it); "an unknown revision" outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    found = git("rev-parse", "--short", rev)
    if found.returncode:
        return "an unknown revision"
    commit = found.stdout.strip()
    changed = git("status", "--porcelain", "--untracked-files=no").stdout.splitlines() if rev == "HEAD" else []
    if any(not line.endswith(".md") for line in changed):   # Markdown is what benchmarks write, not what they run
        return f"{commit} + changes"
    return commit


def command() -> str:
    """This process's command line as a reader would type it from the checkout's root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(shown), *(shlex.quote(a) for a in sys.argv[1:])])
