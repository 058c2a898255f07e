"""Mutation testing of the modules that decide where mail goes and whether it is kept.

Run through ``scripts/mutation`` (it installs mutmut and lowers the priority). For each module
of ``mutation/modules.toml`` (or those named on the command line), one at a time:

1. copy the work tree (tracked files and new files not ignored by git) into
   ``WORKDIR/<module>/``, and add a ``[tool.mutmut]`` table to the copy's pyproject.toml
   that mutates only that module's files and selects only its test files;
2. ``mutmut run`` there (mutmut copies the code into ``mutants/``, runs the selected tests
   once to learn which test calls which function, then each mutant against the tests that
   call its function);
3. read ``mutmut results`` and the diff of every mutant that survived.

It prints the kill rate per module and every surviving mutant, with the reason when
``modules.toml`` records it as equivalent, and at the end a Markdown table for
docs/testing.md. Exit status 1 when a module is below ``--target`` (default 90 %) or a
survivor is not recorded as equivalent.

Kill rate = (killed + timed out) / (mutants - recorded equivalents). A mutant no selected
test calls ("no tests") counts as surviving. Mutants that time out are run again,
with twice the time limit, before they count (a busy machine makes tests slow).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = Path(__file__).resolve().parent / "modules.toml"
DEFAULT_WORKDIR = Path("/tmp/mox-mutation")
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
# Statements not mutated: log calls (their event names and fields are for people reading the
# log; where a log line matters, e.g. the access log, its own tests read it).
DO_NOT_MUTATE = [r"^\s*(self\.)?(log|logger)\.(debug|info|warning|warn|error|exception|critical)\("]


_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|ATTACH|DETACH|"
                  r"PRAGMA|CREATE|ON CONFLICT)\b", re.IGNORECASE)


_QUOTED = re.compile(r"'[^']*'")  # SQL string literals: their case matters


@dataclass
class Equivalent:
    """A surviving mutant recorded as equivalent: by its lines (``before`` -> ``after``), or
    by a rule: ``sql-case``, only the letter case changed in a line of SQL, outside its
    quoted literals (SQLite reads keywords and names in any case)."""

    module: str
    function: str
    before: str  # the original line, stripped ("*": any text)
    after: str  # the mutated line, stripped ("*": any text)
    why: str
    rule: str = ""
    above: str = ""  # the original line just above the changed one ("": any)

    def matches(self, function: str, removed: list[str], added: list[str], original: list[str] = (),
                above: str = "") -> bool:
        if not fnmatch.fnmatch(function, self.function):
            return False
        if self.above and not _like(self.above, above):
            return False
        if self.rule == "sql-case":
            return (len(removed) == len(added) > 0 and all(_in_sql(a, list(original)) for a in removed)
                    and all(a != b and a.lower() == b.lower() and _QUOTED.findall(a) == _QUOTED.findall(b)
                            for a, b in zip(removed, added, strict=True)))
        return any(_like(self.before, r) for r in removed) and any(_like(self.after, a) for a in added)


def _in_sql(line: str, original: list[str]) -> bool:
    """``line`` is SQL: it has a keyword, or it continues a string literal (the lines before
    it in ``original``, the hunk as it was, are string literals back to one with a keyword)."""
    if _SQL.search(line):
        return True
    if line[:1] not in ('"', "'") or line not in original:
        return False
    for prev in reversed(original[:original.index(line)]):
        if prev[:1] not in ('"', "'"):
            return False
        if _SQL.search(prev):
            return True
    return False


def _like(pattern: str, text: str) -> bool:
    """``text`` equals ``pattern``, where ``*`` in the pattern stands for any text."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), text) is not None


@dataclass
class Mutant:
    name: str
    status: str
    function: str = ""
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    why: str = ""  # recorded as equivalent: why

    def describe(self, short: bool = False) -> str:
        """The function and the change; ``short``: only the changed part of each line, with a
        little context."""
        cut = _changed_part if short else (lambda a, b: (a, b))
        change = "; ".join("`{}` -> `{}`".format(*cut(a, b)) for a, b in zip(self.removed, self.added, strict=False))
        if len(self.removed) != len(self.added):
            change = f"`{' / '.join(self.removed)}` -> `{' / '.join(self.added)}`"
        return f"{self.function}: {change}"


def _changed_part(a: str, b: str, context: int = 16) -> tuple[str, str]:
    """``a`` and ``b`` without the start and end they share, but ``context`` characters."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    q = 0
    while q < min(len(a), len(b)) - p and a[-1 - q] == b[-1 - q]:
        q += 1
    start = max(0, p - context)

    def part(x: str) -> str:
        end = min(len(x), len(x) - q + context)
        return ("…" if start else "") + x[start:end] + ("…" if end < len(x) else "")

    return part(a), part(b)


@dataclass
class Result:
    module: str
    mutants: list[Mutant]
    seconds: float

    @property
    def killed(self) -> int:
        return sum(m.status in KILLED for m in self.mutants)

    @property
    def equivalent(self) -> list[Mutant]:
        return [m for m in self.mutants if m.status not in KILLED and m.why]

    @property
    def survivors(self) -> list[Mutant]:
        return [m for m in self.mutants if m.status not in KILLED and not m.why]

    @property
    def rate(self) -> float:
        counted = len(self.mutants) - len(self.equivalent)
        return 100.0 * self.killed / counted if counted else 100.0


def load_config(path: Path = CONFIG) -> tuple[dict[str, dict], list[Equivalent]]:
    data = tomllib.loads(path.read_text())
    equivalents = [Equivalent(e["module"], e["function"], e.get("from", ""), e.get("to", ""), e["why"],
                              e.get("rule", ""), e.get("above", "")) for e in data.get("equivalent", [])]
    return data["modules"], equivalents


def copy_tree(dest: Path) -> None:
    """The work tree as it is now (uncommitted changes included), without ignored files."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.is_file():  # deleted in the work tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def mutated_paths(spec: dict) -> list[str]:
    """The files to mutate as mutmut sees them in the copy: a plugin's package
    (``plugins/<dist>/<package>/...``) is placed at the copy's top level (see
    :func:`place_plugins`), so that mutmut's module names (from the path under ``mutants/``)
    are the names the tests import, e.g. ``mox_webhandlers.static``."""
    return [str(Path(*Path(p).parts[2:])) if p.startswith("plugins/") else p for p in spec["paths"]]


def place_plugins(work: Path, spec: dict) -> None:
    """Copy the package of each mutated plugin file to the top level of the copy. mutmut puts
    ``mutants/`` first on sys.path, so the tests import the mutated package from there and
    not the work tree's editable install."""
    for p in spec["paths"]:
        if p.startswith("plugins/"):
            package = Path(*Path(p).parts[:3])
            shutil.copytree(work / package, work / package.name, dirs_exist_ok=True)


def mutmut_table(spec: dict, top: list[str]) -> str:
    """The [tool.mutmut] table for one module."""
    paths = mutated_paths(spec)
    sources = sorted({Path(p).parts[0] for p in paths})
    lines = [
        "",
        "[tool.mutmut]",
        f"source_paths = {json.dumps(sources)}",
        f"only_mutate = {json.dumps(paths)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(spec['tests'])}",
        f"also_copy = {json.dumps(sorted(set(top) - set(sources)))}",
        f"do_not_mutate_patterns = {json.dumps(DO_NOT_MUTATE)}",
        "use_git_change_detection = false",
        "use_setproctitle = false",
        f"timeout_multiplier = {float(spec.get('timeout_multiplier', 15.0))}",
        # mutmut's time estimate counts a test's call only, not its fixtures (servers started)
        f"timeout_constant = {float(spec.get('timeout_constant', 1.0))}",
        "",
    ]
    return "\n".join(lines)


def mutmut(work: Path, *args: str, env: dict[str, str] | None = None, log=None, timeout: float | None = None):
    """Run mutmut in a session of its own; afterwards whatever is left of it is killed: the
    peers (mox, smtp-sink) started by a test process that mutmut killed at its time limit."""
    exe = Path(sys.executable).parent / "mutmut"
    proc = subprocess.Popen([str(exe), *args], cwd=work, env=env, text=True, start_new_session=True,
                            stdout=log if log is not None else subprocess.PIPE,
                            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


_FUNC = re.compile(r"\.x_(.+?)__mutmut_\d+$|\.x\u01c1(.+?)\u01c1(.+?)__mutmut_\d+$")


def function_of(name: str) -> str:
    m = _FUNC.search(name)
    if m is None:
        return name
    return m.group(1) if m.group(1) else f"{m.group(2)}.{m.group(3)}"


def diff_lines(diff: str) -> tuple[list[str], list[str], list[str], str]:
    """The removed and the added lines of a mutant's diff, its hunk as it was (context and
    removed lines), and the line above the first removed one, each stripped."""
    lines = [line for line in diff.splitlines() if not line.startswith(("---", "+++", "@@", "#"))]
    removed = [line[1:].strip() for line in lines if line.startswith("-")]
    added = [line[1:].strip() for line in lines if line.startswith("+")]
    original = [line[1:].strip() for line in lines if line.startswith(("-", " "))]
    first = next((i for i, line in enumerate(lines) if line.startswith("-")), 0)
    above = lines[first - 1][1:].strip() if first > 0 else ""
    return removed, added, original, above


def read_results(work: Path, env: dict[str, str], only: list[str]) -> list[Mutant]:
    out = mutmut(work, "results", "--all", "true", env=env)
    mutants = []
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if not sep or "__mutmut_" not in name:
            continue
        if only and not any(fnmatch.fnmatch(name, pattern) for pattern in only):
            continue
        mutants.append(Mutant(name, status, function_of(name)))
    return mutants


def recheck_timeouts(work: Path, env: dict[str, str], only: list[str], names: list[str], jobs: int) -> list[Mutant]:
    """Run the mutants that timed out again with twice the time limit: on
    a machine busy with other work a slow test is not a mutant caught. Those timing out again
    hang or slow the tests down for real (counted as killed, as mutmut does)."""
    pyproject = work / "pyproject.toml"
    text = pyproject.read_text()
    m = re.search(r"^timeout_multiplier = ([0-9.]+)$", text, re.MULTILINE)
    assert m is not None
    pyproject.write_text(text[:m.start(1)] + str(2 * float(m.group(1))) + text[m.end(1):])
    print(f"   {len(names)} timed out: running them again with twice the time limit", flush=True)
    with (work / "mutmut.log").open("a") as log:
        mutmut(work, "run", "--max-children", str(jobs), *names, env=env, log=log)
    return read_results(work, env, only)


def module_env(spec: dict) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MOX_CONFIG", None)
    env.update(spec.get("env", {}))
    return env


def run_module(key: str, spec: dict, equivalents: list[Equivalent], workdir: Path, jobs: int) -> Result:
    work = workdir / key
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy_tree(work)
    place_plugins(work, spec)
    top = sorted(p.name for p in work.iterdir())
    with (work / "pyproject.toml").open("a") as f:
        f.write(mutmut_table(spec, top))
    env = module_env(spec)
    only = spec.get("only", [])
    start = time.monotonic()
    with (work / "mutmut.log").open("w") as log:
        r = mutmut(work, "run", "--max-children", str(jobs), *only, env=env, log=log)
    mutants = read_results(work, env, only)
    if r.returncode != 0 or not mutants:
        tail = (work / "mutmut.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"mutmut run failed for {key} (exit {r.returncode}), see {work}/mutmut.log:\n{tail}")
    timed_out = [m.name for m in mutants if m.status == "timeout"]
    if timed_out:
        recheck_timeouts(work, env, only, timed_out, jobs)
    (work / "seconds").write_text(f"{time.monotonic() - start:.0f}\n")
    return collect(key, spec, equivalents, workdir)


def collect(key: str, spec: dict, equivalents: list[Equivalent], workdir: Path) -> Result:
    """The results of the last run of module ``key`` in its work directory, each survivor
    matched against the recorded equivalents."""
    work = workdir / key
    if not (work / "mutants").is_dir():
        raise SystemExit(f"{key} has not been run (no {work}/mutants)")
    env = module_env(spec)
    mutants = read_results(work, env, spec.get("only", []))
    seconds = float((work / "seconds").read_text()) if (work / "seconds").exists() else 0.0
    for m in mutants:
        if m.status in KILLED:
            continue
        shown = mutmut(work, "show", m.name, env=env).stdout
        m.removed, m.added, original, above = diff_lines(shown)
        for e in equivalents:
            if fnmatch.fnmatch(key, e.module) and e.matches(m.function, m.removed, m.added, original, above):
                m.why = e.why
                break
    return Result(key, mutants, seconds)


def print_result(res: Result, verbose: bool = False) -> None:
    statuses: dict[str, int] = {}
    for m in res.mutants:
        statuses[m.status] = statuses.get(m.status, 0) + 1
    print(f"\n== {res.module}: {res.rate:.1f} % killed ({res.killed} of {len(res.mutants)} mutants, "
          f"{len(res.equivalent)} equivalent) in {res.seconds:.0f} s  {statuses}", flush=True)
    for why, group in equivalent_groups(res).items():
        print(f"   equivalent ({len(group)}): {why}")
        for m in group if verbose else []:
            print(f"      {m.name}: {m.describe()}")
    for m in res.survivors:
        print(f"   SURVIVED ({m.status}) {m.name}\n      {m.describe()}")


def equivalent_groups(res: Result) -> dict[str, list[Mutant]]:
    groups: dict[str, list[Mutant]] = {}
    for m in res.equivalent:
        groups.setdefault(m.why, []).append(m)
    return groups


def markdown(results: list[Result], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| module | mutants | killed | equivalent | survived | kill rate |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.module} | {len(r.mutants)} | {r.killed} | {len(r.equivalent)} | "
                     f"{len(r.survivors)} | {r.rate:.1f} % |")
    for r in results:
        if not r.equivalent and not r.survivors:
            continue
        lines += ["", f"**{r.module}**", ""]
        for why, group in equivalent_groups(r).items():
            lines.append(f"- equivalent: {why}")
            lines += [f"  - {m.describe(short=True)}" for m in group]
        lines += [f"- not explained: {m.describe(short=True)}" for m in r.survivors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="keys of mutation/modules.toml (default: all)")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="mutants tested at once (default: half the CPUs)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--target", type=float, default=90.0, help="kill rate a module must reach (%%)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every equivalent mutant")
    parser.add_argument("--report", action="store_true",
                        help="no new run: the results of each module's last run in --workdir, with the "
                             "equivalents recorded now")
    args = parser.parse_args(argv)
    modules, equivalents = load_config()
    if args.list:
        for key, spec in modules.items():
            print(f"{key}: {', '.join(spec['paths'])}{' ' + str(spec['only']) if spec.get('only') else ''}\n"
                  f"    tests: {' '.join(spec['tests'])}")
        return 0
    unknown = [m for m in args.modules if m not in modules]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; see --list")
    results = []
    for key in args.modules or list(modules):
        if args.report:
            res = collect(key, modules[key], equivalents, args.workdir)
        else:
            print(f"-- {key}: mutating {', '.join(modules[key]['paths'])}", flush=True)
            res = run_module(key, modules[key], equivalents, args.workdir, args.jobs)
        print_result(res, args.verbose)
        results.append(res)
    command = "scripts/mutation" + (" --report" if args.report else "") + "".join(f" {m}" for m in args.modules)
    print("\n" + markdown(results, command))
    if args.json:
        args.json.write_text(json.dumps([{
            "module": r.module, "rate": round(r.rate, 1), "seconds": round(r.seconds),
            "mutants": [{"name": m.name, "status": m.status, "function": m.function, "removed": m.removed,
                         "added": m.added, "equivalent": m.why} for m in r.mutants]} for r in results], indent=1))
    failed = [r.module for r in results if r.rate < args.target or r.survivors]
    if failed:
        print(f"\nbelow {args.target:g} % or with unexplained survivors: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
