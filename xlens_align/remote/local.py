"""A real NDIF server on 127.0.0.1 (CPU), for tests, notebooks and benchmarks; tiny checkpoints.

>>> with LocalServer([tiny_checkpoint(tmp / "a", "llama")]) as server:
...     a = xa.remote.RemoteModel(tmp / "a", host=server.host)

`LocalServer` drives the repository's ``scripts/ndif/up.sh`` / ``down.sh`` (install the server
first with ``scripts/ndif/setup.sh``) with free ports and its own run directory, deploys the
given model directories, and stops exactly the processes it started, by PID, on `stop` (also
when `start` fails). It differs from the hosted NDIF in that it runs on the CPU, one replica
per model, without API keys, and serves only the checkpoints it deployed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["LocalServer", "model_key", "scripts_dir", "tiny_checkpoint"]

_PORTS = ("REDIS_PORT", "S3_PORT", "API_PORT", "RAY_GCS_PORT", "RAY_CLIENT_PORT", "RAY_DASHBOARD_PORT")


def scripts_dir() -> Path:
    """``scripts/ndif`` of the repository (or ``XLENS_NDIF_SCRIPTS``)."""
    d = Path(os.environ.get("XLENS_NDIF_SCRIPTS") or Path(__file__).resolve().parents[2] / "scripts" / "ndif")
    if not (d / "up.sh").is_file():
        raise FileNotFoundError(
            f"no NDIF server scripts at {d}: a local server needs the xlens-align repository "
            "(scripts/ndif) or XLENS_NDIF_SCRIPTS pointing at a copy"
        )
    return d


def model_key(path: str | os.PathLike) -> str:
    """The key nnsight's text-generation model sends for a local checkpoint directory."""
    data = {"repo_id": str(Path(path).resolve()), "revision": None, "task": "text-generation"}
    return "nnsight.modeling.transformers.TransformersModel:" + json.dumps(data)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _deploy_file(models: list[Path], scripts: Path) -> str:
    entry = (scripts / "deploy-model.yaml.in").read_text()
    blocks = []
    for m in models:
        size = sum(f.stat().st_size for f in m.glob("*.safetensors")) or 1
        blocks.append(
            entry.replace("@PATH@", str(m))
            .replace("@MODEL_KEY@", model_key(m))
            .replace("@SIZE_BYTES@", str(size))
        )
    return (scripts / "deploy.yaml.in").read_text().replace("@MODELS@\n", "".join(blocks))


class LocalServer:
    """An NDIF stack on loopback serving `models` (checkpoint directories), on free ports.

    run_dir: where pid files and logs go (default: a new temporary directory, removed by
    `stop` unless `keep_logs`). ready_timeout: seconds `start` may take.
    """

    def __init__(
        self,
        models: list[str | os.PathLike],
        *,
        run_dir: str | os.PathLike | None = None,
        ready_timeout: float = 240.0,
        keep_logs: bool = False,
    ) -> None:
        if isinstance(models, str | os.PathLike) or not models:
            raise TypeError(f"models must be a non-empty list of checkpoint directories, got {models!r}")
        self.models = [Path(m).resolve() for m in models]
        for m in self.models:
            if not (m / "config.json").is_file():
                raise FileNotFoundError(f"models: {str(m)!r} is not a checkpoint directory (no config.json)")
        self.scripts = scripts_dir()
        self._own_dir = run_dir is None
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="xlens-ndif-"))
        self.ready_timeout = float(ready_timeout)
        self.keep_logs = keep_logs
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.started = False

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.ports['API_PORT']}"

    def env(self) -> dict[str, str]:
        """The environment up.sh / down.sh run with (ports, run directory, deploy file)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NDIF_", "RAY_"))}
        env.update({k: str(v) for k, v in self.ports.items()})
        env["RUN_DIR"] = str(self.run_dir)
        env["DEPLOY_FILE"] = str(self.run_dir / "deploy.yaml")
        env["READY_TIMEOUT_S"] = str(int(self.ready_timeout))
        return env

    def start(self) -> LocalServer:
        """Start the stack and deploy the models; RuntimeError with the log's tail on failure
        (everything started is stopped again)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "deploy.yaml").write_text(_deploy_file(self.models, self.scripts))
        self.started = True
        try:
            r = subprocess.run(
                ["bash", str(self.scripts / "up.sh")], env=self.env(), capture_output=True, text=True,
                timeout=self.ready_timeout + 60,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            self.stop()
            raise RuntimeError(
                f"the local NDIF server did not come up within {self.ready_timeout + 60:g} s"
            ) from e
        (self.run_dir / "up.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(
                f"the local NDIF server did not start (logs: {self.run_dir / 'logs'}):\n"
                + "\n".join((r.stdout + r.stderr).strip().splitlines()[-25:])
            )
        return self

    def stop(self, service: str | None = None) -> str:
        """Stop what `start` started (by PID), or only `service` ('api', 'ray', 's3', 'redis':
        to test failures). Returns down.sh's output."""
        if not self.started:
            return ""
        names = [service] if service is not None else []
        r = subprocess.run(
            ["bash", str(self.scripts / "down.sh"), *names], env=self.env(), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        if service is not None:
            return r.stdout + r.stderr
        self.started = False
        if self._own_dir and not self.keep_logs and r.returncode == 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return r.stdout + r.stderr

    def actor_pids(self) -> list[int]:
        """PIDs of the model actors (Ray workers in the session of the Ray head this server started)."""
        pid_file = self.run_dir / "pids" / "ray.pid"
        if not pid_file.exists():
            return []
        ps = subprocess.run(
            ["ps", "-o", "pid=,args=", "-s", pid_file.read_text().strip()], capture_output=True, text=True
        )
        return [int(line.split()[0]) for line in ps.stdout.splitlines() if "CPUModelActor" in line]

    def log(self, name: str, lines: int = 40) -> str:
        """The last `lines` lines of a service's log ('api', 'ray', 'deploy', ...)."""
        f = self.run_dir / "logs" / f"{name}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) if f.exists() else ""

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Residual streams carry the model's state from "
    "one layer to the next; a patch writes mapped values into them and the loss says what survived. "
    "Tokenizers cut the same text differently, so positions are aligned by characters, not by index. "
    "Paris is the capital of France, Berlin of Germany and Rome of Italy. 0123456789 (){}[]<>=+-*/"
)


def tiny_checkpoint(
    path: str | os.PathLike,
    family: str = "llama",
    *,
    vocab_size: int = 400,
    n_layers: int = 2,
    d_model: int = 64,
    seed: int = 0,
) -> Path:
    """Save a random-init causal LM of `family` ('llama', 'mistral', 'qwen2', 'gemma3') with a
    small byte-level BPE tokenizer (adds BOS) to `path`; deterministic given the arguments."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    cfg = _tiny_config(family, len(fast), n_layers, d_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).to(torch.float32).eval()
    model.save_pretrained(out)
    return out


def _tiny_config(family: str, vocab: int, n_layers: int, d_model: int) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    classes = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "gemma3": Gemma3TextConfig,
    }
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    kw: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, pad_token_id=3, tie_word_embeddings=False,
    )  # fmt: skip
    if family in ("mistral", "gemma3"):
        kw["sliding_window"] = 16
    if family == "gemma3":
        kw["head_dim"] = d_model // 4
    return classes[family](**kw)
