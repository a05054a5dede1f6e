"""`alltoall` transport: the bulk-synchronous baseline, Megatron's all-to-all token dispatcher.

One exchange = two collectives over the process group: `all_to_all_single` of the [W, E_local] counts, read
on the host to size the second one, then `all_to_all_single` of the rows with those split sizes. NCCL on
GPUs, gloo on CPUs. Like Megatron's dispatcher it moves one row per (token, expert) in each direction (a
token routed to two experts of one rank crosses twice, and the weighted combine happens on the token's rank);
the one-sided transports move one row per (token, rank) (protocol.py). It also adds the host round trip for
the counts (a host sync on a GPU) and the collective's barrier: every rank waits for the slowest before any
row moves. It is the comparison point. Its `bytes_sent` counts the rows to other ranks plus the count words
sent to them. With CPU tensors (gloo) every collective waits at most
`timeout_s` and then raises `ExchangeTimeout` (a collective cannot tell which peer is missing); with CUDA
tensors (NCCL) the process group's own timeout and watchdog apply, since a timed host wait would be a sync.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from .heap import ExchangeTimeout
from .layout import REGION_NAMES, SIGNAL_BYTES, TOKEN_EXPERT
from .protocol import ExchangeResult, check_send


def unavailable_reason(device: torch.device) -> str | None:
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    return None


class AllToAllExchange:
    """Per-(token, expert) exchanges over the process group's all_to_all_single (module docstring)."""

    row_unit = TOKEN_EXPERT  # forward.py sends one row per (token, expert) through it

    def __init__(self, group, num_local_experts: int, timeout_s: float):
        self.group, self.num_local_experts, self.timeout_s = group, num_local_experts, float(timeout_s)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.failed: str | None = None

    def _all_to_all(self, out, inp, out_splits, in_splits, region: int, what: str) -> None:
        if self.failed is not None:
            raise RuntimeError(f"rank {self.rank}: an earlier exchange failed ({self.failed}); the ranks' collectives "
                               "no longer match: recreate the layer (and its process group) on every rank")
        if inp.is_cuda:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)
            return
        work = dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except RuntimeError as err:
            self.failed = (f"rank {self.rank}: all_to_all_single of the {what} ({REGION_NAMES[region]} exchange) did "
                           f"not complete within {self.timeout_s:g} s: a peer is dead, slow, or skipped an exchange "
                           f"({err})")
            raise ExchangeTimeout(self.failed) from None

    def run(self, region: int, send_rows: torch.Tensor, send_counts: torch.Tensor) -> ExchangeResult:
        """Same contract as OneSidedExchange.run; `region` is only a label here."""
        w, el, me = self.world_size, self.num_local_experts, self.rank
        per_peer = check_send(send_rows, send_counts, w, el, None)
        device = send_rows.device
        counts_out = send_counts.to(device)
        counts_in = torch.empty_like(counts_out)
        self._all_to_all(counts_in, counts_out, None, None, region, "counts")
        recv_counts = counts_in.cpu()  # the host needs the split sizes: this is the baseline's host sync
        in_splits, out_splits = per_peer.tolist(), recv_counts.sum(1).tolist()
        rows = send_rows.new_empty(sum(out_splits), send_rows.shape[1])
        self._all_to_all(rows, send_rows.contiguous(), out_splits, in_splits, region, "rows")
        row_bytes = send_rows.shape[1] * send_rows.element_size()
        bytes_sent = (sum(in_splits) - in_splits[me]) * row_bytes + (w - 1) * el * SIGNAL_BYTES
        return ExchangeResult(rows, recv_counts, bytes_sent)

    def close(self) -> None:
        pass
