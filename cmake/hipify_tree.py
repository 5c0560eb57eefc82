"""Hipify the backend sources of cpp/ into a directory of the build tree.

    python hipify_tree.py --source cpp --output BUILD/hipified --stamp BUILD/hipified.stamp
                          [--exclude platform_cuda.h ...]

Copies the backend sources (*.cu) and headers (*.cuh, *.h) of --source into a scratch directory,
runs torch.utils.hipify over the copy, and moves the results into --output with flat names:
foo.cu becomes foo.hip, headers keep their names, so the sources' #include "..." lines still
resolve. The source tree is never written. Files whose hipified text did not change keep their
time stamps (nothing recompiles for nothing); files no longer produced are removed. --stamp is
touched last, as the build's record that the tree is up to date.

--exclude names files that must not be hipified: cpp/platform_cuda.h, which hip/platform_hip.h
replaces (hipify would also rename it to platform_hip.h and shadow the real one).
"""

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile

SOURCE_SUFFIXES = (".cu", ".cuh", ".h")


def load_hipify():
    try:
        from torch.utils.hipify import hipify_python
    except ImportError as e:  # the CMake side checks this at configure time; this is the backstop
        sys.exit(f"hipify_tree.py: cannot import torch.utils.hipify ({e}); "
                 f"install torch into {sys.executable} (pip install torch)")
    return hipify_python


def hipify_into(hipify_python, source, output, exclude):
    names = sorted(n for n in os.listdir(source)
                   if n.endswith(SOURCE_SUFFIXES) and n not in exclude
                   and os.path.isfile(os.path.join(source, n)))
    for n in names:
        # hipify renames files whose names say "cuda"; the #include lines naming them would not follow.
        if "cuda" in n.lower():
            sys.exit(f"hipify_tree.py: {n}: a backend file name must not contain 'cuda' "
                     "(hipify would rename it); exclude it or rename it")

    os.makedirs(output, exist_ok=True)
    produced = {}
    with tempfile.TemporaryDirectory(prefix=".hipify-", dir=os.path.dirname(os.path.abspath(output))) as scratch:
        tree = os.path.join(scratch, "src")
        os.makedirs(tree)
        for n in names:
            shutil.copyfile(os.path.join(source, n), os.path.join(tree, n))
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            hipify_python.hipify(
                project_directory=tree,
                output_directory=tree,
                extensions=SOURCE_SUFFIXES,
                header_include_dirs=(),
                includes=("*",),
                show_detailed=False,
                show_progress=False,
                hip_clang_launch=True,  # hip-clang compiles <<<...>>>; leave launches alone
                is_pytorch_extension=False,
            )
        for n in names:
            # Where hipify put it (out of place: a hip/ subdirectory, .cu -> .hip).
            rel = hipify_python.get_hip_file_path(n, is_pytorch_extension=False)
            path = os.path.join(tree, rel)
            if not os.path.isfile(path):
                sys.stderr.write(log.getvalue())
                sys.exit(f"hipify_tree.py: hipify produced no output for {n} (expected {rel})")
            flat = os.path.basename(rel)
            with open(path, encoding="utf-8") as f:
                produced[flat] = f.read()

    changed = 0
    for flat, text in produced.items():
        target = os.path.join(output, flat)
        if os.path.isfile(target):
            with open(target, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        with open(target + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(target + ".tmp", target)
        changed += 1
    for stale in set(os.listdir(output)) - set(produced):
        path = os.path.join(output, stale)
        if os.path.isfile(path):
            os.remove(path)
    return len(produced), changed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="directory with the CUDA sources (cpp/)")
    parser.add_argument("--output", required=True, help="directory to write the hipified sources to")
    parser.add_argument("--stamp", help="file to touch once the output is up to date")
    parser.add_argument("--exclude", action="append", default=[], help="file name to leave out (repeatable)")
    args = parser.parse_args()

    source = os.path.abspath(args.source)
    output = os.path.abspath(args.output)
    if output == source or output.startswith(source + os.sep):
        sys.exit("hipify_tree.py: --output must lie outside --source (the source tree is never written)")
    total, changed = hipify_into(load_hipify(), source, output, set(args.exclude))
    print(f"hipify_tree.py: {total} files hipified into {output} ({changed} changed)")
    if args.stamp:
        with open(args.stamp, "w", encoding="utf-8") as f:
            f.write("hipified\n")


if __name__ == "__main__":
    main()
