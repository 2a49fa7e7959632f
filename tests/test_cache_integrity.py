"""The caches check themselves: a damaged or scrambled quantized base is rebuilt with a notice naming the cache, a
bad cached LoRA start is refused, a base rewritten in place is a new entry; the key reads no weights; Hub snapshots
and `subfolder` are honoured; killed makers leave nothing behind and waiting says who holds the lock."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import DATA


def _kwargs(**extra):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return {"quantization_config": config, "dtype": torch.float32, **extra}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("QLORA_PLUGIN_CACHE_DIR", str(path))
    return path


@pytest.fixture
def model_copy(tiny_models, tmp_path) -> Path:
    source = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], source)
    return source


def _bytes(entry) -> dict:
    return {p.name: p.read_bytes() for p in Path(entry).iterdir() if p.suffix == ".safetensors"}


def _cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# 24.2: a damaged entry is found when used, rebuilt, and the message names the cache, not the user's model.
@pytest.mark.parametrize("damage", ["truncated shard", "garbage config.json", "missing index", "missing record"])
def test_damaged_entry_is_rebuilt_with_a_notice_naming_the_cache(model_copy, cache_dir, caplog, damage):
    from transformers import AutoModelForCausalLM

    from qlora_plugin.core.options import StrategyOptions
    from qlora_plugin.quant import cache as quantized_cache
    from qlora_plugin.ecosystem.runtime import Runtime

    entry = Path(quantized_cache.cached_base(str(model_copy), _kwargs()))
    good = _bytes(entry)
    shard = entry / "model.safetensors"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage config.json":
        (entry / "config.json").write_text("{not json")
    elif damage == "missing index":
        (entry / "model.safetensors.index.json").unlink()
    else:
        (entry / quantized_cache.ENTRY_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        model = quantized_cache.qlora_load_model(StrategyOptions(), str(model_copy), _kwargs(),
                                                 Runtime("cpu", False, "none"))
    assert model is not None and quantized_cache.cached_entry(model) == str(entry)  # loaded from the rebuilt entry
    assert _bytes(entry) == good
    notices = [m for m in _cache_warnings(caplog) if "damaged" in m]
    assert len(notices) == 1 and str(entry) in notices[0] and str(cache_dir) in notices[0]
    AutoModelForCausalLM.from_pretrained(str(entry), dtype=torch.float32)  # whole again


def test_scrambled_packed_bytes_under_an_intact_header_are_caught(model_copy, cache_dir, caplog):
    """Bytes of the packed 4-bit weights overwritten, header intact, modification time set back: the change time
    moved, so the digest is checked, and it differs."""
    from qlora_plugin.quant.cache import cached_base

    entry = Path(cached_base(str(model_copy), _kwargs()))
    good = _bytes(entry)
    shard = entry / "model.safetensors"
    stat = shard.stat()
    header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    with open(shard, "r+b") as f:
        f.seek(header + 4096)
        f.write(os.urandom(4096))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and _bytes(entry) != good
    with caplog.at_level(logging.WARNING):
        assert cached_base(str(model_copy), _kwargs()) == str(entry)
    assert _bytes(entry) == good
    assert any("SHA-256" in m and str(entry) in m for m in _cache_warnings(caplog))


def test_an_untouched_entry_is_not_read_again(model_copy, cache_dir, monkeypatch):
    """Checking an entry costs a stat per file on a plain run: no digest pass when the stamps are as recorded."""
    from qlora_plugin.quant import cache_contents
    from qlora_plugin.quant.cache import cached_base

    entry = cached_base(str(model_copy), _kwargs())

    def must_not_hash(path):
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(cache_contents, "sha256_file", must_not_hash)
    assert cached_base(str(model_copy), _kwargs()) == entry


def test_base_rewritten_in_place_with_its_mtime_restored_is_a_new_entry(model_copy, cache_dir):
    from safetensors.torch import load_file, save_file

    from qlora_plugin.quant.cache import cached_base

    first = cached_base(str(model_copy), _kwargs())
    shard = model_copy / "model.safetensors"
    stat = shard.stat()
    weights = load_file(shard)
    weights["model.layers.0.mlp.up_proj.weight"] *= -1.0  # same size, same header
    tmp = model_copy / "rewritten"
    save_file(weights, tmp, metadata={"format": "pt"})
    with open(shard, "r+b") as f:  # in place: same inode
        f.write(tmp.read_bytes())
    tmp.unlink()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns, shard.stat().st_ino) == (
        stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert cached_base(str(model_copy), _kwargs()) != first


# 26.8: the key reads no weights.
def test_cache_key_reads_headers_not_weights(tmp_path, cache_dir, monkeypatch):
    """64 MiB of weights: keying the entry hashes kilobytes (headers and config), not the weights."""
    import hashlib

    from safetensors.torch import save_file

    from qlora_plugin.quant.cache import cached_base

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(16 * 1024 * 1024)}, folder / "model.safetensors")
    hashed = []
    real = hashlib.sha256

    class Counting:
        def __init__(self, data=b""):
            self.inner = real(data)
            hashed.append(len(data))

        def update(self, data):
            hashed.append(len(data))
            self.inner.update(data)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Counting)
    cached_base(str(folder), _kwargs())  # keys the entry, then finds "w" is no module's weight: not cached
    assert 0 < sum(hashed) < 1024 * 1024  # kilobytes (headers, JSON, library internals), not 64 MiB
    from qlora_plugin.quant import cache_source

    identity = cache_source.source_identity(str(folder))
    assert set(identity["files"]) == {"config.json", "model.safetensors"}
    assert {"size", "mtime_ns", "ctime_ns", "inode", "header"} <= set(identity["files"]["model.safetensors"])


# 26.7: a Hub id uses the cache from its snapshot in the Hugging Face cache, keyed on the commit.
def _hub_cache(root: Path, repo: str, model: str, commit: str) -> Path:
    """A Hugging Face hub cache laid out as huggingface_hub lays it: refs/main, blobs/<sha256>, and
    snapshots/<commit>/ of relative symbolic links into blobs."""
    import hashlib

    storage = root / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "blobs").mkdir()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    for file in Path(model).iterdir():
        if file.is_file():
            data = file.read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_id_uses_the_cache_from_its_local_snapshot(tiny_models, tmp_path, cache_dir, monkeypatch):
    import huggingface_hub.constants

    from qlora_plugin.core.options import StrategyOptions
    from qlora_plugin.quant import cache as quantized_cache
    from qlora_plugin.ecosystem.runtime import Runtime

    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(hub, "tiny-org/tiny-llama", tiny_models["llama"], commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))

    entry = quantized_cache.cached_base("tiny-org/tiny-llama", _kwargs())
    assert entry is not None and os.path.basename(entry).startswith("tiny-llama-")
    record = json.loads((Path(entry) / quantized_cache.ENTRY_FILE).read_text())
    assert record["files"]["commit"] == commit
    assert quantized_cache.cached_base("tiny-org/tiny-llama", _kwargs(revision="main")) == entry
    assert quantized_cache.cached_base("tiny-org/tiny-llama", _kwargs(revision=commit)) == entry
    assert quantized_cache.cached_base("tiny-org/tiny-llama", _kwargs(revision="v2")) is None  # not on disk
    assert quantized_cache.cached_base("tiny-org/absent", _kwargs()) is None
    model = quantized_cache.qlora_load_model(StrategyOptions(), "tiny-org/tiny-llama", _kwargs(),
                                             Runtime("cpu", False, "none"))
    assert model.name_or_path == "tiny-org/tiny-llama" and model.config._commit_hash == commit
    assert quantized_cache.cached_entry(model) == entry


# 24.6: `subfolder` is the base, for the cache, the LoftQ start and the adapter's recorded base.
@pytest.mark.parametrize("quantized_cache", [True, False])
def test_subfolder_is_the_base_for_the_cache_loftq_and_the_adapter(tiny_models, tmp_path, cache_dir,
                                                                   quantized_cache):
    from datasets import load_dataset
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.quant.cache import cached_entry
    from qlora_plugin.strategies.loftq import base_weights

    root = tmp_path / "repo"
    shutil.copytree(tiny_models["gpt2"], root)  # another model at the root: reading it would be wrong
    shutil.copytree(tiny_models["llama_odd"], root / "base")
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, max_length=32, model_init_kwargs={"subfolder": "base"})
    trainer = make_trainer("qlora", options={"quantized_cache": quantized_cache}, model=str(root), args=args,
                           train_dataset=load_dataset(str(DATA))["train"])
    model = trainer.model
    base = os.path.realpath(root / "base")
    assert model.peft_config["default"].base_model_name_or_path == base
    assert model.get_base_model().config.hidden_size == 72  # llama_odd, not the root's gpt2
    assert os.path.realpath(base_weights(model).folder) == base
    entry = cached_entry(model)
    assert (entry is not None) == quantized_cache
    if entry:
        assert os.path.basename(entry).startswith("repo-base-")
        assert json.loads((Path(entry) / "qlora_plugin_cache.json").read_text())["source"] == str(root / "base")


# 24.3: the cached LoRA start is checked (digest, finite values).
def _lora_model(tiny_models):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


@pytest.mark.parametrize("damage", ["nan", "scrambled"])
def test_bad_cached_lora_start_is_removed_and_computed_again(tiny_models, cache_dir, caplog, damage):
    from safetensors.torch import load_file, save_file

    from qlora_plugin.strategies import start_cache

    model = _lora_model(tiny_models)
    start_cache.save_start(model, "k" * 64, {"layers": 4})
    path = Path(start_cache._path("k" * 64))
    tensors = load_file(path)
    metadata = {"facts": json.dumps({"layers": 4})}
    if damage == "nan":
        tensors = {name: torch.full_like(t, float("nan")) for name, t in tensors.items()}
        metadata["sha256"] = start_cache._digest(tensors)  # consistent with its contents: still refused
    else:
        tensors = {name: torch.randn_like(t) for name, t in tensors.items()}
        metadata["sha256"] = load_file_metadata(path).get("sha256", "")  # the good tensors' digest
    save_file(tensors, path, metadata=metadata)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with caplog.at_level(logging.WARNING):
        assert start_cache.load_start(model, "k" * 64) is None
    assert not path.exists()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)  # untouched
    assert any(str(path) in m and "damaged" in m for m in _cache_warnings(caplog))


def load_file_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_a_start_that_is_not_finite_is_not_cached(tiny_models, cache_dir):
    from qlora_plugin.strategies import start_cache

    model = _lora_model(tiny_models)
    next(p for n, p in model.named_parameters() if "lora_A" in n).data[0, 0] = float("inf")
    start_cache.save_start(model, "n" * 64, {})
    assert not os.path.exists(start_cache._path("n" * 64))


def test_good_cached_lora_start_round_trips(tiny_models, cache_dir):
    from qlora_plugin.strategies import start_cache

    model = _lora_model(tiny_models)
    start_cache.save_start(model, "g" * 64, {"layers": 4})
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.zero_()
    assert start_cache.load_start(model, "g" * 64) == {"layers": 4}
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if "lora_" in n)


# 24.3: a run that goes non-finite stops at the first logged step, with one line.
def test_run_with_a_nan_adapter_stops_at_the_first_logged_step(tiny_models, tmp_path):
    from datasets import load_dataset
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.core.errors import QLoRAPluginError

    out = tmp_path / "out"
    args = SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=2, report_to="none", use_cpu=True,
                     max_length=32, logging_steps=1, save_strategy="no")
    trainer = make_trainer("qlora", options={"init_lora_weights": "default"}, model=tiny_models["llama"], args=args,
                           train_dataset=load_dataset(str(DATA))["train"])
    for name, param in trainer.model.named_parameters():
        if "lora_A" in name:
            param.data.fill_(float("nan"))
    with pytest.raises(QLoRAPluginError, match=r"Training stopped at step 1: .*gradient norm nan"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert not (out / "adapter_model.safetensors").exists()


# 24.9: leftovers of killed makers are cleaned; waiting says who holds the lock; a dead holder's lock is taken over.
KILLED_MAKER = """
import sys, time
import torch
from transformers import BitsAndBytesConfig
from qlora_plugin.quant import cache

original = cache._quantize_into
def slow(*args):
    original(*args)
    print("staged", flush=True)
    time.sleep(600)
cache._quantize_into = slow
config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
cache.cached_base(sys.argv[1], {"quantization_config": config, "dtype": torch.float32})
"""


@pytest.mark.slow  # seconds: a process killed or waiting on the Hub's retries (make test-fast: under a minute)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_staging_left_by_a_killed_maker_is_removed_by_the_next_run(model_copy, cache_dir, tmp_path, how):
    from qlora_plugin.quant.cache import cached_base

    child = subprocess.Popen([sys.executable, "-c", KILLED_MAKER, str(model_copy)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "QLORA_PLUGIN_LOAD": ""})
    try:
        assert child.stdout.readline().strip() == "staged"
        assert [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")]
    finally:
        child.send_signal(how)
        child.wait(timeout=60)
    assert [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")]  # left behind by the killed process
    entry = cached_base(str(model_copy), _kwargs())
    assert entry is not None
    assert [n for n in os.listdir(cache_dir) if n.startswith(".tmp-")] == []


def test_waiting_on_the_lock_says_who_holds_it(tmp_path, caplog):
    from qlora_plugin.quant.cache_lock import entry_lock

    lock = str(tmp_path / "locks" / "entry.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom qlora_plugin.quant.cache_lock import entry_lock\n"
         "with entry_lock(sys.argv[1], 'x'):\n    print('held', flush=True)\n    time.sleep(2.5)\n", lock],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "QLORA_PLUGIN_LOAD": ""})
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.WARNING), entry_lock(lock, "the cached 4-bit base E", announce_seconds=0.5):
            pass
    finally:
        holder.wait(timeout=60)
    said = [m for m in _cache_warnings(caplog) if m.startswith("Waiting")]
    assert len(said) >= 2  # periodically
    assert f"process {holder.pid} on {socket.gethostname()} since " in said[0]
    assert "the cached 4-bit base E" in said[0] and lock in said[0]


def test_lock_held_for_a_dead_process_is_taken_over(tmp_path, caplog):
    import fcntl

    from qlora_plugin.quant.cache_lock import entry_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "entry.lock"
    stale = open(lock, "a+")  # another open file description: its lock excludes ours as another process's would
    fcntl.flock(stale, fcntl.LOCK_EX)
    stale.write(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": time.time() - 60}))
    stale.flush()
    acquired = threading.Event()

    def take():
        with entry_lock(str(lock), "E"):
            acquired.set()

    try:
        with caplog.at_level(logging.WARNING):
            worker = threading.Thread(target=take, daemon=True)
            worker.start()
            assert acquired.wait(timeout=20), "waited forever on a dead process's lock"
            worker.join(timeout=20)
    finally:
        stale.close()
    assert any("Taking over" in m and str(dead.pid) in m for m in _cache_warnings(caplog))


NAN_HOOK = '''
from transformers import TrainerCallback

from qlora_plugin import hookimpl


class Poison(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.data.fill_(float("nan"))


@hookimpl
def qlora_trainer_callbacks():
    return [Poison()]
'''


@pytest.mark.slow
def test_script_that_goes_nan_ends_with_one_line_and_no_adapter(tiny_models, dataset_dir, tmp_path):
    from conftest import TRAIN_FLAGS, run_python

    hook = tmp_path / "poison.py"
    hook.write_text(NAN_HOOK)
    out = tmp_path / "out"
    result = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                         dataset_dir, "--strategy", "qlora", "--init_lora_weights", "default", "--qlora_hooks",
                         str(hook), *TRAIN_FLAGS, "--output_dir", str(out)], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]  # a user error: status 2, like every other
    errors = [line for line in result.stderr.splitlines() if "qlora-plugin: error:" in line]  # after a progress bar
    assert len(errors) == 1 and "Training stopped at step 1" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Training completed" not in result.stdout + result.stderr
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_training_run_on_a_hub_id_reuses_the_cache_and_records_the_hub_id(tiny_models, dataset_dir, tmp_path):
    """`--model_name_or_path org/name` with the model in the Hugging Face cache (HF_HUB_CACHE, offline): the second
    run loads the cached 4-bit base; the adapter names the Hub id; the LoftQ start reads the snapshot."""
    from conftest import TRAIN_FLAGS, run_python

    hub = tmp_path / "hub"
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    _hub_cache(hub, "tiny-org/tiny-llama", tiny_models["llama"], commit)
    reports = []
    for run in ("first", "second"):
        out = tmp_path / run
        result = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", "tiny-org/tiny-llama", "--dataset_name",
                             dataset_dir, "--strategy", "qlora", *TRAIN_FLAGS, "--output_dir", str(out)], cwd=tmp_path,
                            env_extra={"HF_HUB_CACHE": str(hub), "QLORA_PLUGIN_CACHE_DIR": str(tmp_path / "cache")})
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((out / "qlora_plugin_report.json").read_text()))
    entry = reports[0]["quantization"]["cached_base"]
    assert entry and entry == reports[1]["quantization"]["cached_base"]
    assert json.loads((Path(entry) / "qlora_plugin_cache.json").read_text())["files"]["commit"] == commit
    assert json.loads((tmp_path / "second" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tiny-org/tiny-llama"
    assert reports[1]["adapter"]["init"]["method"] == "loftq_calibrated"


def test_fp16_overflow_alone_does_not_stop_the_run_but_a_lasting_one_does():
    """Under fp16 loss scaling an infinite gradient norm is an overflow the scaler skips (a run's first steps):
    only `FP16_OVERFLOW_LOGS` in a row stop it. In bf16 or fp32 the first one does."""
    from types import SimpleNamespace

    from qlora_plugin.core.errors import QLoRAPluginError
    from qlora_plugin.training.finite_guard import FP16_OVERFLOW_LOGS, StopOnNonFinite

    state = SimpleNamespace(global_step=1)
    guard = StopOnNonFinite()
    for _ in range(FP16_OVERFLOW_LOGS - 1):
        guard.on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": 2.0, "grad_norm": float("inf")})
    guard.on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": 2.0, "grad_norm": 1.0})  # the count resets
    for _ in range(FP16_OVERFLOW_LOGS - 1):
        guard.on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": 2.0, "grad_norm": float("inf")})
    with pytest.raises(QLoRAPluginError, match="gradient norm inf"):
        guard.on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": 2.0, "grad_norm": float("inf")})
    with pytest.raises(QLoRAPluginError, match="gradient norm inf"):
        StopOnNonFinite().on_log(SimpleNamespace(fp16=False), state, None, logs={"grad_norm": float("inf")})
    with pytest.raises(QLoRAPluginError, match="loss nan"):
        StopOnNonFinite().on_log(SimpleNamespace(fp16=True), state, None, logs={"loss": float("nan")})


def test_an_entry_touched_but_unchanged_is_checked_once(model_copy, cache_dir, monkeypatch):
    """A new stamp with the same bytes (touch, chmod, a restore) costs one digest pass, then the record is
    updated and later runs stat only."""
    from qlora_plugin.quant import cache_contents
    from qlora_plugin.quant.cache import cached_base

    entry = Path(cached_base(str(model_copy), _kwargs()))
    os.chmod(entry / "model.safetensors", 0o644)  # moves the change time, not the bytes
    hashed, real = [], cache_contents.sha256_file
    monkeypatch.setattr(cache_contents, "sha256_file", lambda path: hashed.append(path) or real(path))
    assert cached_base(str(model_copy), _kwargs()) == str(entry)
    assert hashed == [str(entry / "model.safetensors")]
    assert cached_base(str(model_copy), _kwargs()) == str(entry)
    assert len(hashed) == 1
