"""Which tier does what under `privacy` (hierfed.config.PrivacyConfig), checked once before launch,
and the wrappers each role puts around its strategy or its uplink.

    noise_at: edge         devices clip; each edge adds N(0,(σC)²) to its devices' sum every edge round
    noise_at: cloud        devices clip; the cloud adds it to the sum over all clients (edges pass sums on)
    noise_at: distributed  devices clip and each adds N(0,(σC)²/n), n = clients of its edge's sum

Adaptive clipping (privacy.adaptive_clip): the noising tier's NoisySum keeps C; its link to its
children carries C down and the clipped-count up (AdaptiveParent), and with the noise at the cloud
over edges each edge relays both (RelayChild up, ClipRelay under its AdaptiveParent down).
"""

from __future__ import annotations

from hierfed.comm.codecs import parse_codec
from hierfed.comm.codecs.values import StochasticQuantizer
from hierfed.errors import HierfedError
from hierfed.privacy.noise import NoisySum
from hierfed.privacy.ring import FixedPoint, SharedGrid
from hierfed.privacy.secagg_link import SecAggChild, SecAggParent
from hierfed.privacy.transport import AdaptiveParent, ClipRelay, PrivateChild, RelayChild
from hierfed.sim.behaviour import drops_out, is_available
from hierfed.strategy import STRATEGIES, Strategy

_LOSSLESS = ("identity", "fp32")


def noise_tier(cfg, flat: bool) -> str | None:
    """The tier whose parent adds the noise ("edge" or "cloud"); None without noise or when the
    clients add it themselves (distributed)."""
    p = cfg.privacy
    if not p.noisy or p.noise_at == "distributed":
        return None
    return "cloud" if flat else p.noise_at


def aggregations_per_round(cfg, flat: bool) -> int:
    """How many noised sums a sampled client's updates enter per cloud round: τ2 edge rounds when the
    noise is added at the edges (or by the clients of an edge), 1 at the cloud or when flat."""
    if flat or cfg.privacy.noise_at == "cloud":
        return 1
    return cfg.schedule.tau2


def check_secagg(placement, cfg) -> None:
    """Combinations secure aggregation at the edges cannot honour, refused before launch in one line."""
    src = placement.topology.source
    if placement.flat:
        raise HierfedError(f"{src}: privacy.secagg runs at the edges and a flat topology has none (its devices' virtual "
                           "clients would share a rank with no edge to sum them); use a topology with edges")
    up = cfg.compression.device_up
    if "topk" in up:
        raise HierfedError(f"privacy.secagg with compression.device_up {up!r}: top-k keeps a different set of coordinates per "
                           "client and masked sums need one shared pattern; top-k is refused under secure aggregation")
    if up not in _LOSSLESS and _grid_bits(up) is None:
        raise HierfedError(f"privacy.secagg with compression.device_up {up!r}: masked updates are integers in a ring (fixed "
                           "point, or the int8/int4 codec's codes on a shared grid); use identity, fp32, int8 or int4")
    if _grid_bits(up) is not None and cfg.schedule.edge_mode == "fedbuff":
        raise HierfedError("privacy.secagg with an int8/int4 device_up and FedBuff edges is not supported (staleness "
                           "weights would rescale codes off the shared grid); use identity or fp32")
    if not STRATEGIES[cfg.aggregation.edge.name].reducible:
        raise HierfedError(f"privacy.secagg: the edge sees only its devices' sum, but aggregation.edge.name="
                           f"{cfg.aggregation.edge.name} must see every update")
    for e in placement.edges:
        if e.clients or e.split_devices:
            raise HierfedError(f"{src}: edge '{e.name}' trains part of its clients' updates itself (train_locally or split "
                               "devices); privacy.secagg needs edges that only aggregate")


def check_privacy(placement, cfg) -> None:
    """Combinations DP-FedAvg and secure aggregation cannot honour, refused before launch in one line."""
    p = cfg.privacy
    if p.secagg:
        check_secagg(placement, cfg)
    if not p.dp:
        return
    src = placement.topology.source
    if placement.flat and p.noise_at == "edge" and p.noisy:
        raise HierfedError(f"{src}: privacy.noise_at is edge but a flat topology has no edge tier; use noise_at: cloud or distributed")
    for e in placement.edges:
        if e.clients:
            raise HierfedError(f"{src}: edge '{e.name}' trains its own client (train_locally); DP clipping runs on devices only, "
                               "so privacy.clip needs an edge without train_locally")
    if any(d.split_layers is not None for d in placement.devices):
        raise HierfedError(f"{src}: privacy.clip with split devices is not supported (the edge trains part of their update, unclipped)")
    if p.noisy and (cfg.schedule.timed or cfg.schedule.over_selection > 0 or not all(d.behaviour.reliable for d in placement.devices)):
        # the noise is scaled to the sampled clients; dropped, late or stale updates change who is summed
        raise HierfedError(f"{src}: privacy.noise_multiplier > 0 with unreliable devices (availability, dropout), a straggler "
                           "policy, over-selection or FedBuff edges is not supported: the accountant assumes every sampled client contributes")
    tier = noise_tier(cfg, placement.flat)
    if p.noisy and not placement.flat and p.noise_at != "cloud":
        if not STRATEGIES[cfg.aggregation.edge.name].reducible:
            raise HierfedError(f"privacy: noise is added to the edges' sums, but aggregation.edge.name={cfg.aggregation.edge.name} "
                               "must see every update; use a reducible rule (fedavg, fedavgm, fedadam, ...)")
    if tier == "cloud" and not STRATEGIES[cfg.aggregation.cloud.name].reducible:
        raise HierfedError(f"privacy: noise is added to the cloud's sum, but aggregation.cloud.name={cfg.aggregation.cloud.name} "
                           "must see every update; use a reducible rule")
    if p.noisy and tier == "cloud" and not placement.flat:
        # the cloud's sum must be the sum of the clipped client updates: one edge round, plain averaging, lossless
        edge = cfg.aggregation.edge
        if cfg.schedule.tau2 != 1:
            raise HierfedError(f"privacy.noise_at: cloud needs schedule.tau2: 1 (got {cfg.schedule.tau2}): after several edge rounds "
                               "one client moves its edge's update by more than C; add the noise at the edges instead")
        if edge.name != "fedavg" or (edge.server_lr or 1.0) != 1.0:
            raise HierfedError("privacy.noise_at: cloud needs aggregation.edge fedavg with server_lr 1, so an edge passes its "
                               "clients' sum on unchanged")
        if cfg.compression.edge_up not in _LOSSLESS:
            raise HierfedError(f"privacy.noise_at: cloud needs a lossless compression.edge_up (got {cfg.compression.edge_up!r}): "
                               "a lossy edge uplink with error feedback would carry unclipped residuals")
    if cfg.compression.device_up not in _LOSSLESS and p.noisy:
        raise HierfedError(f"privacy: compression.device_up {cfg.compression.device_up!r} with DP noise is not supported "
                           "(the codec's error-feedback residual would leave the clipped norm); use identity or fp32")


def wrap_strategy(strategy: Strategy, cfg, tier: str, flat: bool, who: int) -> Strategy:
    """The tier's strategy, with the DP noise if this tier adds it."""
    if noise_tier(cfg, flat) != tier:
        return strategy
    p = cfg.privacy
    return NoisySum(strategy, p.value_noise_multiplier, p.clip, cfg.seed, who, p.adaptive_clip)


def _grid_bits(spec: str) -> int | None:
    """8 or 4 for an int8/int4 uplink codec without a sparsifier (SecAgg masks its codes), else None."""
    codec = parse_codec(spec)
    if codec.sparsifier is None and isinstance(codec.values, StochasticQuantizer):
        return codec.values.bits
    return None


def fixed_point(cfg, placement, edge: int | None = None) -> FixedPoint | SharedGrid:
    """Secure aggregation's encoding: fixed point over its range for the largest edge's clients, or
    the int8/int4 codec's codes on one shared grid over the same range (compression.device_up), in
    the ring that edge `edge`'s clients' sum of codes fits (Z_2^16 or Z_2^32; the largest edge's
    when None). Every device of the edge and the edge compute it from the topology alike."""
    p = cfg.privacy
    bound = p.secagg_bound
    if bound is None:  # a clipped client's coordinate is at most C; its share of distributed noise has std <= σC
        bound = p.clip * (1 + (6 * p.noise_multiplier if p.noise_at == "distributed" else 0))
    bits = _grid_bits(cfg.compression.device_up)
    if bits is not None:
        clients = [placement.edges[edge]] if edge is not None else placement.edges
        return SharedGrid(bound, bits, fan_out=max(len(e.all_clients) for e in clients))
    return FixedPoint(bound, max(len(e.all_clients) for e in placement.edges))


def behaviour_dropouts(cfg, device, sampled):
    """(cloud round, edge round) -> the clients of `device` that the behaviour model
    (hierfed.sim.behaviour) has reachable but vanishing mid-round, as hierfed.sim.schedule.plan_sync
    decides; None when its clients never drop or the edges are FedBuff (attempts, not edge rounds)."""
    b, seed = device.behaviour, cfg.seed
    if b.dropout <= 0.0 or cfg.schedule.edge_mode == "fedbuff":
        return None

    def dropped(t: int, s: int) -> set[int]:
        chosen = sampled(t)
        return {c for c in device.clients if c in chosen and is_available(b, seed, t, s, c) and drops_out(b, seed, t, s, c)}

    return dropped


def wrap_child(link, cfg, placement, edge: int | None, start_round: int, agg_size, device=None, sampled=None):
    """A device's uplink: secure aggregation inside (privacy.secagg), clipping and distributed noise
    outside it (privacy.clip). `agg_size(t)`: the clients of the sum this device's clients join in
    cloud round t; `device` (its topology entry) and `sampled(t)` (the round's sampled clients) let
    the behaviour model's dropouts drive SecAgg's dropout recovery."""
    p = cfg.privacy
    edge_rounds = 1 if placement.flat else cfg.schedule.tau2
    if p.secagg:
        drops = behaviour_dropouts(cfg, device, sampled) if device is not None and sampled is not None else None
        link = SecAggChild(link, fixed_point(cfg, placement, edge), p.secagg_threshold, edge, start_round, edge_rounds,
                           error_feedback=cfg.compression.error_feedback, dropouts=drops)
    if not p.dp:
        return link
    return PrivateChild(link, p.clip, p.noise_multiplier, uniform=p.noisy, distributed=p.noise_at == "distributed",
                        seed=cfg.seed, start_round=start_round, edge_rounds=edge_rounds, agg_size=agg_size,
                        adaptive=p.adaptive_clip is not None)


def wrap_up(link, cfg, placement):
    """An edge's link to the cloud, and the ClipRelay its link to the devices must share (None when
    there is nothing to relay): with adaptive clipping and the noise at the cloud, the cloud's C
    comes down it after the parameters and the devices' clipped-count goes up it after the edge's
    update (RelayChild). Returns (link, relay)."""
    if cfg.privacy.adaptive_clip is None or noise_tier(cfg, placement.flat) != "cloud":
        return link, None
    relay = ClipRelay()
    return RelayChild(link, relay), relay


def wrap_parent(link, cfg, placement, edge: int | None, start_round: int, keeper: Strategy | ClipRelay | None = None):
    """A parent's link to its children: an edge's (`edge`: its index) under secure aggregation when
    privacy.secagg is on; any parent's carrying adaptive clipping's C down and the clipped-count up
    when `keeper` keeps C — this tier's strategy, wrapped, when it adds the noise (a NoisySum), or
    an edge's ClipRelay (`wrap_up`) when the cloud does. The cloud's link (`edge` None) is never
    masked: secure aggregation runs at the edges, and a flat topology with it is refused."""
    p = cfg.privacy
    if p.secagg and edge is not None:
        link = SecAggParent(link, fixed_point(cfg, placement, edge), p.secagg_threshold, edge, start_round, cfg.schedule.tau2)
    if p.adaptive_clip is not None and isinstance(keeper, NoisySum | ClipRelay):
        link = AdaptiveParent(link, keeper)
    return link
