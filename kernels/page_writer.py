"""Adapter writes into the arena's pages: one batched copy per adapter, off the compute stream on CUDA.

A SmolLM2 adapter on all seven modules is 420 matrices; copying them one by one is 420 small
host-to-device copies (each blocking the host when made from pageable memory). Instead the rows
are laid out on the host exactly as their pages will hold them (``pack_pages``: two tensor copies
per matrix, host only), followed by the page ids, in one buffer; the device gets it with one copy
and scatters it with one ``index_copy_``.

On CUDA the buffer is pinned, so the copy is asynchronous, and both run on a side stream: decode
steps already queued on the compute stream keep running while an adapter streams in. Ordering:

* the side stream first waits for the compute stream, because the pages being written may have
  been KV blocks or another adapter's rows read by work still queued there;
* the compute stream waits for the copy (an event; the host never waits) in ``ready(uids)``,
  called before the first step that reads the adapter, and in ``forget(uid)``, called when the
  adapter is evicted, before its pages can be handed to anything else. A prefetched adapter that
  no step reads yet therefore never holds up the steps that run meanwhile.

The pinned buffer is released once its copy is done (torch's pinned allocator tracks that).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kernels.lora_pages import AdapterWeights, adapter_matrices, pack_pages, storage_view
from server.page_layout import AdapterPageTable


class PageWriter:
    def __init__(self, arena: torch.Tensor) -> None:
        self.arena = arena
        self._cuda = arena.device.type == "cuda"
        self._stream = torch.cuda.Stream(arena.device) if self._cuda else None
        self._inflight: dict[int, tuple[torch.cuda.Event, torch.Tensor]] = {}

    def write(self, table: AdapterPageTable, weights: AdapterWeights) -> None:
        """Copy an adapter's rows (``A`` or ``A.T``, ``B^T``, DoRA's ``g``) into its pages (layout:
        server/page_layout.py), in its storage dtype."""
        arena = storage_view(self.arena, table.dtype)
        elems = arena.shape[1]
        ids = table.all_pages()
        data_bytes = len(ids) * elems * arena.element_size()
        # Zeroed, so a page's tail past its rows is finite: the pages become KV blocks again later,
        # and the reference attention reads whole blocks (masking, not skipping, unused slots).
        host = torch.zeros(data_bytes + 8 * len(ids), dtype=torch.uint8, pin_memory=self._cuda)
        data, index = _split(host, data_bytes, arena.dtype, elems)
        pack_pages(adapter_matrices(table, weights), elems, data, ids)
        if ids and (min(ids) < 0 or max(ids) >= arena.shape[0]):
            raise ValueError("a matrix's pages lie outside the arena")
        index.numpy()[:] = ids
        if not self._cuda:
            arena.index_copy_(0, index, data)
            return
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(arena.device))
        with torch.cuda.stream(stream):
            dev = torch.empty_like(host, device=arena.device)
            dev.copy_(host, non_blocking=True)
            dev_data, dev_index = _split(dev, data_bytes, arena.dtype, elems)
            arena.index_copy_(0, dev_index, dev_data)
            done = torch.cuda.Event()
            done.record(stream)
        self._inflight[table.uid] = (done, dev)  # dev lives on the side stream until the copy is done

    def ready(self, uids: Iterable[int]) -> None:
        """The compute stream waits (device-side) for these adapters' copies, if still pending."""
        if not self._inflight:
            return
        current = torch.cuda.current_stream(self.arena.device)
        for uid in uids:
            hit = self._inflight.pop(uid, None)
            if hit is not None:
                current.wait_event(hit[0])
        for uid in [u for u, (done, _) in self._inflight.items() if done.query()]:
            del self._inflight[uid]

    def forget(self, uid: int) -> None:
        """Before an evicted adapter's pages are reused: order its copy before later compute work."""
        self.ready((uid,))


def _split(buf: torch.Tensor, data_bytes: int, dtype: torch.dtype,
           page_elems: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The page contents ``[n, page_elems]`` and the int64 page ids at the end of ``buf``."""
    data = buf[:data_bytes].view(dtype).view(-1, page_elems)
    return data, buf[data_bytes:].view(torch.int64)
