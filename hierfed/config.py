"""Run settings: one typed, validated object per concern, defaults embedded so `hierfed run` needs none.

A run config is YAML with the sections below; every field has a default. Command-line overrides are
dotted assignments (`--set schedule.tau1=10`) applied before validation, so they are checked the
same way as the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from hierfed.data import DataConfig
from hierfed.errors import HierfedError
from hierfed.validation import KnownFields, first_error


class _Section(KnownFields):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Where the model comes from. Nothing is fetched: a packaged model, a local path, or a config."""

    source: Literal["minilm", "gpt2", "llama", "path"] = "minilm"
    path: str | None = None  # a local transformers directory (source=path)
    tokenizer: str | None = None  # a local tokenizer directory (default: the model's; MiniLM's for gpt2/llama)
    size: Literal["tiny", "small"] = "tiny"  # for models built from a config (gpt2, llama)
    # Fields of the transformers config that replace the size table's, e.g. {num_hidden_layers: 16}
    # (gpt2 names: n_layer, n_embd, n_head); built-from-config models only.
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # frozen base weights (adapters train in float32)
    max_length: int = Field(32, ge=4, le=8192)  # tokens per example (padded/truncated)

    @model_validator(mode="after")
    def _path_iff_local(self) -> ModelConfig:
        if self.source == "path" and not self.path:
            raise ValueError("source=path needs model.path (a local transformers directory)")
        if self.source != "path" and self.path:
            raise ValueError(f"model.path is only used with source=path (source is {self.source!r})")
        if self.config_overrides and self.source not in ("gpt2", "llama"):
            raise ValueError("model.config_overrides applies to models built from a config (gpt2, llama)")
        return self


class PeftConfig(_Section):
    """The adapter that is trained and travels. Methods map onto peft's own config classes."""

    # "none" trains every parameter (no adapter): the full-model baseline that PEFT is measured against.
    method: Literal["lora", "loha", "lokr", "ia3", "none"] = "lora"
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    options: dict[str, Any] = Field(default_factory=dict)  # passed through to the peft config
    # FFA-LoRA (Sun et al. 2024): every lora_A stays frozen at its seeded initialisation (the same on
    # every rank), only B trains and travels, so averaging B averages the product B A exactly.
    ffa_lora: bool = False

    @model_validator(mode="after")
    def _ffa_needs_lora(self) -> PeftConfig:
        if self.ffa_lora and self.method != "lora":
            raise ValueError(f"ffa_lora freezes LoRA's A factors; it needs method=lora (got {self.method})")
        return self


class TrainConfig(_Section):
    """The local optimiser each client runs for tau1 steps (fresh every edge round: clients are stateless)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only
    max_grad_norm: float | None = Field(1.0, gt=0)


class ScheduleConfig(_Section):
    """Round arithmetic: one cloud round = tau2 edge rounds, one edge round = tau1 local steps."""

    rounds: int = Field(6, ge=1)  # cloud rounds
    tau1: int = Field(5, ge=1)  # local steps per edge round
    tau2: int = Field(2, ge=1)  # edge rounds per cloud round (flat topologies aggregate once per round)
    client_fraction: float = Field(1.0, gt=0, le=1)  # clients sampled per cloud round
    eval_every: int = Field(1, ge=1)  # the cloud evaluates every N cloud rounds (and always round 0 and the last)
    # Local steps per cloud round of a flat topology: "tau1" (one FedAvg round of tau1 steps), or
    # "tau1*tau2": the local work of a hierarchical cloud round, so flat and hierarchical points of a
    # sweep compare equal work per cloud round.
    flat_local_steps: Literal["tau1", "tau1*tau2"] = "tau1"
    eval_batch_size: int = Field(64, ge=1)
    # How the clients of a cloud round are drawn: "fixed" = round(client_fraction · N) of them, without
    # replacement; "poisson" = each client independently with probability client_fraction (what
    # DP accountants assume for their amplification by sampling; docs/privacy.md).
    sampling: Literal["fixed", "poisson"] = "fixed"
    # Stragglers and asynchrony (docs/heterogeneity.md), decided from the simulated model clock:
    # synchronous edge rounds cut off at a deadline (seconds, or the time the fastest quantile of
    # the reachable clients arrive, or the first ceil(n/(1+o)) of an over-selected sample), late
    # clients dropped or counted with the steps they finished; or FedBuff edges (buffer_k arrivals
    # per edge update, staleness weight (1+s)^-staleness_exponent).
    straggler: Literal["wait", "drop", "partial"] = "wait"
    deadline: float | None = Field(None, gt=0, allow_inf_nan=False)  # simulated seconds per edge round
    deadline_quantile: float | None = Field(None, gt=0, le=1)  # wait for the fastest fraction
    over_selection: float = Field(0.0, ge=0, allow_inf_nan=False)  # sample (1+o) x the clients, keep the first 1/(1+o)
    normalise: Literal["none", "fednova"] = "none"  # partial work: FedNova's tau_eff / tau_i scaling
    edge_mode: Literal["sync", "fedbuff"] = "sync"
    buffer_k: int | None = Field(None, ge=1)  # FedBuff: arrivals per edge update; None: the edge's reachable clients
    staleness_exponent: float = Field(0.5, ge=0, allow_inf_nan=False)  # FedBuff: g(s) = (1+s)^-a

    @model_validator(mode="after")
    def _stragglers(self) -> ScheduleConfig:
        cut = self.deadline is not None or self.deadline_quantile is not None or self.over_selection > 0
        if self.edge_mode == "fedbuff" and (self.straggler != "wait" or cut):
            raise ValueError("edge_mode=fedbuff has no deadline: straggler must be wait and deadline, deadline_quantile, "
                             "over_selection unset")
        if self.straggler == "wait" and cut and self.edge_mode == "sync":
            raise ValueError("deadline, deadline_quantile and over_selection need straggler: drop or partial (wait has no cut-off)")
        if self.straggler != "wait" and not cut:
            raise ValueError(f"straggler={self.straggler} needs a cut-off: deadline, deadline_quantile or over_selection")
        if self.buffer_k is not None and self.edge_mode != "fedbuff":
            raise ValueError("buffer_k applies to edge_mode=fedbuff")
        return self

    @property
    def timed(self) -> bool:
        """Clients are scheduled from the model clock (deadlines, over-selection, FedBuff)."""
        return self.straggler != "wait" or self.edge_mode == "fedbuff"

    @property
    def sampling_fraction(self) -> float:
        """The fraction of clients sampled per cloud round: client_fraction x (1 + over_selection), at most 1."""
        return min(1.0, self.client_fraction * (1.0 + self.over_selection))


class AggregatorConfig(_Section):
    """Aggregation at one tier (see hierfed.strategy and docs/aggregation.md). Each rule reads its own fields."""

    name: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean", "krum", "multikrum",
                  "normclip", "lora_exact"] = "fedavg"
    # The server step η. None: the rule's default, 1.0 (fedavg, fedavgm, the robust rules), 0.1 (fedadam,
    # fedadagrad), 0.01 (fedyogi; Flower's defaults for the adaptive rules).
    server_lr: float | None = Field(None, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # fedavgm
    beta1: float = Field(0.9, ge=0, lt=1)  # fedadam, fedyogi, fedadagrad: first moment (Reddi et al. 2021)
    beta2: float = Field(0.99, ge=0, lt=1)  # fedadam, fedyogi: second moment
    tau: float | None = Field(None, gt=0)  # adaptivity τ; None: 1e-9 (fedadam, fedadagrad), 1e-3 (fedyogi)
    trim_beta: float = Field(0.2, ge=0, lt=0.5)  # trimmed_mean: fraction cut at each end, floor(β·n) values
    krum_f: int = Field(0, ge=0)  # krum, multikrum: Byzantine children tolerated (needs n > 2f + 2 children)
    multikrum_m: int | None = Field(None, ge=1)  # multikrum: children averaged; None: n - f
    clip_norm: float | None = Field(None, gt=0)  # normclip: L2 bound on each child's update (required)

    @model_validator(mode="after")
    def _normclip_needs_a_bound(self) -> AggregatorConfig:
        if self.name == "normclip" and self.clip_norm is None:
            raise ValueError("name=normclip needs clip_norm (the L2 bound on each child's update)")
        return self


class ClientConfig(_Section):
    """The client side of the algorithm, chosen once for the run (hierfed.strategy.client,
    docs/aggregation.md): none (plain local training: FedAvg's client), fedprox (proximal term
    mu/2 ||w - w_start||^2), scaffold (control variates, option II; local SGD without momentum),
    fednova (normalised averaging by each client's local steps)."""

    algorithm: Literal["none", "fedprox", "scaffold", "fednova"] = "none"
    mu: float = Field(0.01, ge=0, allow_inf_nan=False)  # fedprox: the proximal weight


class AggregationConfig(_Section):
    edge: AggregatorConfig = AggregatorConfig()
    cloud: AggregatorConfig = AggregatorConfig()


def _check_codec(spec: str) -> str:
    from hierfed.comm.codecs import parse_codec

    try:
        return parse_codec(spec).spec
    except HierfedError as e:
        raise ValueError(str(e)) from None


class CompressionConfig(_Section):
    """Codec chains per link and direction (see docs/compression.md), e.g. "topk:0.05 > int8".

    Uplinks carry updates (deltas from the last global); downlinks carry the new global as a delta
    from what the children already hold (the first round after start sends it whole).
    """

    device_up: str = "identity"  # device -> its parent (edge, or the cloud when flat)
    edge_up: str = "identity"  # edge -> cloud
    edge_down: str = "identity"  # edge -> its devices
    cloud_down: str = "identity"  # cloud -> its children
    error_feedback: bool = True  # lossy uplinks keep each sender's residual across rounds

    @field_validator("device_up", "edge_up", "edge_down", "cloud_down")
    @classmethod
    def _valid(cls, v: str) -> str:
        return _check_codec(v)

    @model_validator(mode="after")
    def _feedback(self) -> CompressionConfig:
        """Error feedback on an uplink with scaled rand-k would fail on every device after its first
        edge round (the dim/k scaling makes the residual grow): refuse it here, before launch."""
        from hierfed.comm.codecs import parse_codec
        from hierfed.comm.codecs.sparse import RandK

        for link in ("device_up", "edge_up"):
            spec = getattr(self, link)
            sparsifier = parse_codec(spec).sparsifier
            if self.error_feedback and isinstance(sparsifier, RandK) and sparsifier.scaled:
                raise ValueError(f"{link}={spec!r} with error_feedback: scaling kept values by dim/k makes the "
                                 f"residual grow every round; use '{sparsifier.spec.split(',')[0]},scaled=false', topk, or error_feedback: false")
        return self


class SplitConfig(_Section):
    """Split placement (devices with `split_layers` in the topology): what crosses the device-edge cut."""

    micro_batches: int = Field(4, ge=1)  # a local step's batch is cut into this many pipelined micro-batches
    pipeline: bool = True  # False: stop-and-wait (one micro-batch on the link at a time), the baseline
    activation_codec: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"  # boundary activations on the uplink
    gradient_codec: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"  # their gradients on the downlink
    # fresh: both halves' optimiser state starts anew every edge round, as every client's does;
    # persistent: each split client's state (device half and its copy on the edge) is kept and checkpointed
    optimizer_state: Literal["fresh", "persistent"] = "fresh"


class DeepSpeedSection(_Section):
    """DeepSpeed ZeRO on edges that train: the upper stage of their split devices, or their own
    client (train_locally), sharded over the edge's ranks (hierfed.placement.zero)."""

    enabled: bool | Literal["auto"] = "auto"  # auto: on for edges with several ranks
    zero_stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False  # optimizer state in host memory (DeepSpeed's CPU Adam)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when runtime.device is a GPU, else gloo
    config: dict[str, Any] = Field(default_factory=dict)  # merged into the generated DeepSpeed config


class RuntimeConfig(_Section):
    threads: int = Field(1, ge=1)  # torch threads per rank (ranks usually outnumber cores)
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where models train; a GPU per node-local rank (modulo GPUs)
    # How a rank waits for a message: "poll" tests with a short backoff sleep so waiting ranks leave
    # the cores to ranks that compute (oversubscribed nodes); "block" spins inside MPI, which also
    # keeps large transfers moving (see docs/design.md, Waiting); "auto" picks block when the node's
    # ranks x threads fit its cores, else poll.
    wait: Literal["auto", "poll", "block"] = "auto"
    # Split placement's phase times (metrics.jsonl: edge_phases, device_phases) with the GPU
    # synchronised at every phase boundary: exact per phase, but slower (the overlap is lost).
    profile: bool = False
    progress: bool = True  # the cloud prints a line per round and a final table


class SimConfig(_Section):
    """The simulated clock (hierfed.sim.clock, docs/launch.md): how a round's duration on the cluster
    the topology describes is priced. `model`: a client's FLOPs / its device's rate (deterministic);
    `measured`: its measured seconds / its device's speed (calibration)."""

    compute: Literal["model", "measured"] = "model"
    reference_tflops: float = Field(0.5, gt=0)  # sustained TFLOP/s of a device with speed 1.0 (no tflops given)
    edge_tflops: float = Field(5.0, gt=0)  # an edge without tflops in the topology
    cloud_tflops: float = Field(50.0, gt=0)


class AdaptiveClipConfig(_Section):
    """Adaptive clipping (Andrew et al. 2021): C follows the `quantile` γ of the clients' update norms,
    C <- C·exp(-lr·(b̄ - γ)), b̄ the noised fraction of clients with norm <= C; the count's noise
    (std `count_stddev` σ_b) is paid from noise_multiplier (docs/privacy.md)."""

    quantile: float = Field(0.5, gt=0, lt=1)  # γ: the target fraction of unclipped clients
    lr: float = Field(0.2, gt=0)  # η_C of the geometric update
    count_stddev: float = Field(gt=0)  # σ_b on the sum of clipped-or-not bits (the paper suggests clients per round / 20)


class PrivacyConfig(_Section):
    """Client-level differential privacy (DP-FedAvg) and secure aggregation at the edges (docs/privacy.md).

    `clip` set turns DP-FedAvg on: every client's update is clipped to L2 norm C on its device; with
    noise_multiplier σ > 0, Gaussian noise of std σ·C is added once per aggregation to the SUM at
    `noise_at` (and client weights become uniform). ε at `delta` is reported per round."""

    clip: float | None = Field(None, gt=0)  # C; None: no clipping (and no DP); .inf: the wrappers run but clip nothing
    noise_multiplier: float = Field(0.0, ge=0)  # σ: noise std on the tier's sum is σ·C
    noise_at: Literal["edge", "cloud", "distributed"] = "edge"  # where the noise is added (who is trusted: docs/privacy.md)
    delta: float = Field(1e-5, gt=0, lt=1)  # δ of the (ε, δ) guarantee
    target_epsilon: float | None = Field(None, gt=0)  # stop (checkpointed) before the round that would exceed it
    accountant: Literal["rdp", "pld"] = "rdp"  # dp-accounting's Rényi DP or privacy-loss-distribution accountant
    # Secure aggregation at the edges (Bonawitz et al. 2017): an edge sees only its devices' sum.
    secagg: bool = False
    secagg_threshold: float = Field(0.5, ge=0, lt=1)  # t = floor(f·n) + 1 of an edge round's n clients must survive
    # Fixed-point range: |w·Δ_i| of one client's coordinate (w: its weight, 1 under DP noise); beyond it
    # values saturate. None: privacy.clip (plus 6 noise stds with distributed noise).
    secagg_bound: float | None = Field(None, gt=0)
    adaptive_clip: AdaptiveClipConfig | None = None  # C starts at `clip` and tracks a quantile of the update norms

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.adaptive_clip is not None:
            if self.noise_multiplier <= 0:
                raise ValueError("privacy.adaptive_clip needs privacy.noise_multiplier > 0 (the clip norm is kept by the tier that adds the noise)")
            if self.noise_at == "distributed":
                raise ValueError("privacy.adaptive_clip with noise_at: distributed is not supported: the edge is not trusted, so each "
                                 "client would add its share of the count's noise N(0, σ_b²) to its b − ½ and mask it with its update "
                                 "under SecAgg, which is not implemented; use noise_at: edge or cloud")
            if 2 * self.adaptive_clip.count_stddev <= self.noise_multiplier:
                raise ValueError(f"privacy.adaptive_clip.count_stddev {self.adaptive_clip.count_stddev:g} must exceed noise_multiplier/2 "
                                 f"= {self.noise_multiplier / 2:g}: the count's noise is paid from noise_multiplier (docs/privacy.md)")
        if self.noise_multiplier > 0 and (self.clip is None or self.clip == float("inf")):
            raise ValueError("privacy.noise_multiplier > 0 needs a finite privacy.clip (the noise is σ·C)")
        if self.target_epsilon is not None and self.noise_multiplier == 0:
            raise ValueError("privacy.target_epsilon needs privacy.noise_multiplier > 0 (without noise ε is infinite)")
        if self.secagg and self.secagg_bound is None and (self.clip is None or self.clip == float("inf")):
            raise ValueError("privacy.secagg needs privacy.secagg_bound (the largest |w·Δ_i| of a client) or a finite privacy.clip")
        return self

    @property
    def dp(self) -> bool:
        """Clipping (and possibly noise) is on."""
        return self.clip is not None

    @property
    def noisy(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def value_noise_multiplier(self) -> float:
        """σ_Δ, the multiplier of the noise on the update sum. With adaptive clipping, the paper's split
        (Andrew et al. 2021, Thm. 1): σ_Δ = (σ^-2 - (2σ_b)^-2)^(-1/2), so the sum and the count together
        cost one Gaussian mechanism of multiplier σ; else σ."""
        a = self.adaptive_clip
        if a is None:
            return self.noise_multiplier
        return (self.noise_multiplier**-2 - (2 * a.count_stddev) ** -2) ** -0.5


class CheckpointConfig(_Section):
    every: int = Field(1, ge=1)  # cloud rounds between checkpoints (the last round is always saved)
    keep: int = Field(2, ge=1)  # checkpoints kept on disk


class RunConfig(_Section):
    topology: str = "default"
    seed: int = Field(0, ge=0, lt=2**63)  # every random choice derives from it (hierfed/seeding.py)
    out: str | None = None  # default: runs/<topology>-<timestamp>
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    aggregation: AggregationConfig = AggregationConfig()
    client: ClientConfig = ClientConfig()
    compression: CompressionConfig = CompressionConfig()
    split: SplitConfig = SplitConfig()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    runtime: RuntimeConfig = RuntimeConfig()
    sim: SimConfig = SimConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    @model_validator(mode="after")
    def _model_clock(self) -> RunConfig:
        s = self.schedule
        if s.timed and self.sim.compute != "model":
            raise ValueError(f"schedule.{'edge_mode=fedbuff' if s.edge_mode == 'fedbuff' else 'straggler=' + s.straggler} "
                             "decides from the model clock: it needs sim.compute: model")
        a = self.client.algorithm
        if s.normalise == "fednova" and a not in ("none", "fednova"):
            raise ValueError(f"schedule.normalise=fednova is FedNova's client side; it cannot be combined with client.algorithm={a}")
        if a == "scaffold" and (self.train.optimizer != "sgd" or self.train.momentum > 0):
            raise ValueError("client.algorithm=scaffold needs train.optimizer: sgd with momentum 0 (option II's control "
                             "variate reads the local steps as lr x gradient)")
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    """'schedule.tau1=10' -> (['schedule', 'tau1'], 10); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise HierfedError(f"--set {item!r}: expected KEY=VALUE, e.g. schedule.tau1=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise HierfedError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config (or the embedded defaults), apply overrides, validate; one-line errors."""
    data: dict[str, Any] = {}
    source = "run config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise HierfedError(f"{source}: cannot read run config ({e.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise HierfedError(f"{source}: not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise HierfedError(f"{source}: a run config is a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise HierfedError(first_error(e, source)) from None


# What `hierfed run --resume` may change against the run's saved config.yaml: settings that do not
# change what the ranks compute or exchange. Any other difference (seed, topology, data, model,
# optimiser, codecs, ...) would continue a different run, or hang it (a codec changing how many
# messages a link posts), so it is refused. A key ending in "." covers its whole section.
RESUME_MAY_CHANGE = ("schedule.rounds", "runtime.", "checkpoint.keep", "checkpoint.every", "out")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def resumed_config(saved: Path, config: str | Path | None, overrides: list[str]) -> RunConfig:
    """The config of a resumed run: the saved one (or `config`, when given again) with `overrides`,
    refused in one line naming the first field that differs from the saved run outside
    RESUME_MAY_CHANGE."""
    if not saved.is_file():
        raise HierfedError(f"--resume: {saved} does not exist: {saved.parent} holds no run to continue")
    before = load_config(saved)
    cfg = load_config(saved if config is None else config, overrides)
    old, new = _flatten(before.model_dump(mode="json")), _flatten(cfg.model_dump(mode="json"))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_MAY_CHANGE):
            raise HierfedError(f"--resume: {key} is {new.get(key)!r} but the run in {saved.parent} used {old.get(key)!r}; a resumed run "
                               "keeps its settings (only schedule.rounds, runtime.*, checkpoint.keep/every may change)")
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
