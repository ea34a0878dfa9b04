"""Build, remove or inspect the compiled request path (extproc/compiled.py says why and how).

python -m extproc.compile build     # what `make compile` runs; a no-op when current
python -m extproc.compile clean     # pure Python again
python -m extproc.compile status    # which modules run compiled, and why not
python -m extproc.compile state     # one line: "compiled", or why not
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from extproc import compiled
from extproc.compiled import GROUP, HOT_MODULES, MANIFEST, PACKAGE, fingerprint


def clean() -> int:
    removed = 0
    for path in [*PACKAGE.rglob("*.so"), MANIFEST]:
        if path.exists():
            path.unlink()
            removed += 1
    return removed


def build() -> int:
    """Compile the hot modules and put the extensions beside their sources; every failure
    leaves pure Python and says why.

    The sources are compiled from a copy in a scratch directory: mypy must not see the
    directory the package is installed in (in site-packages it would take every module
    lying there, `mypy_extensions.py` included, for part of the program), and a failed build
    must not leave half its files in the package.
    """
    before = fingerprint()
    opt = os.environ.get("EXTPROC_COMPILE_OPT", "3")  # 0 builds faster, for trying things
    if _read(MANIFEST) == {**before, "opt_level": opt} and _complete():
        print("extproc.compile: the compiled build is current")
        return 0
    clean()
    work = Path(tempfile.mkdtemp(prefix="extproc-mypyc-"))
    cwd = os.getcwd()
    try:
        src = work / "src"
        shutil.copytree(
            PACKAGE, src / "extproc", ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
        os.chdir(src)
        built = _compile(work, opt)
        if built:
            for path in (src / "extproc").rglob("*.so"):
                target = PACKAGE / path.relative_to(src / "extproc")
                shutil.copyfile(path, target)
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    if not built:
        return 0
    if not _complete() or fingerprint() != before:
        clean()
        print("extproc.compile: incomplete build, or sources changed during it; staying pure")
        return 0
    manifest = {**before, "opt_level": opt}
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"extproc.compile: compiled {len(HOT_MODULES)} modules")
    return 0


def _compile(work: Path, opt: str) -> bool:
    """mypyc, then the C compiler, in the current directory (the copy); False: said why."""
    try:
        from mypyc.build import mypycify
        from setuptools import Distribution
    except ImportError as exc:
        print(f"extproc.compile: {exc}; the request path stays pure Python")
        return False
    files = [f"extproc/{m}.py" for m in HOT_MODULES]
    flags = [
        "--ignore-missing-imports",
        "--follow-imports=silent",
        "--cache-dir",
        str(work / "mypy"),
    ]
    try:
        exts = mypycify(
            [*flags, *files], opt_level=opt, group_name=GROUP, target_dir=str(work / "c")
        )
    except BaseException as exc:  # mypy's type errors end in SystemExit
        print(f"extproc.compile: mypyc refused the sources ({exc!r}); staying pure Python")
        return False
    dist = Distribution({"name": "extproc-hot", "ext_modules": exts})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = str(work / "tmp")
    cmd.build_lib = str(work / "lib")
    cmd.parallel = os.cpu_count() or 1
    try:
        dist.run_command("build_ext")
    except BaseException as exc:  # no compiler, or a module that fails
        print(f"extproc.compile: the C build failed ({exc!r}); staying pure Python")
        return False
    return True


def _read(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _complete() -> bool:
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return all(
        any((PACKAGE / f"{m}{suffix}").is_file() for suffix in suffixes) for m in HOT_MODULES
    )


def status() -> int:
    print(compiled.state)
    for name in sorted(compiled.NAMES):
        module = sys.modules.get(name) or importlib.import_module(name)
        kind = "compiled" if str(module.__file__).endswith(".so") else "python"
        print(f"{kind:>9}  {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else "status"
    if command == "build":
        return build()
    if command == "clean":
        print(f"removed {clean()} compiled files")
        return 0
    if command == "status":
        return status()
    if command == "state":  # one line: "compiled", or why not
        print(compiled.state)
        return 0
    print("usage: python -m extproc.compile [build | clean | status | state]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
