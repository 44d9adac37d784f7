"""Registers and commands: capability registers, WQCFG/GRPCFG writes and the
CMD register's commands answered in CMDSTS (``enum idxd_cmdsts_err``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from dma_device.dsa.engine import Engine
from dma_device.dsa.state import (
    DsaConfigError,
    _asdict,
    _Group,
    _WorkQueue,
    log,
)
from pviommu.abi.dsa import (
    Cmd,
    CmdErr,
    DeviceState,
    WqCap,
    WqCfg,
    WqState,
    cmdsts_encode,
    engcap_encode,
    grpcap_encode,
    grpcfg_pack,
    opcap_words,
)


class Registers(Engine):
    """BAR0: what a driver reads and writes to configure and command the device."""

    # ---- capability registers ----------------------------------------------------
    @property
    def version(self) -> int:
        return self.config.version

    @property
    def gencap(self) -> int:
        return self.config.gencap.encode()

    @property
    def wqcap(self) -> int:
        c = self.config
        return WqCap(c.total_wq_size, c.num_wqs, 0, c.shared_mode, c.dedicated_mode).encode()

    @property
    def grpcap(self) -> int:
        return grpcap_encode(self.config.num_groups, self.config.total_rdbufs)

    @property
    def engcap(self) -> int:
        return engcap_encode(self.config.num_engines)

    def opcap_words(self) -> tuple[int, int, int, int]:
        return opcap_words(self.opcap)

    @property
    def gensts(self) -> DeviceState:
        return self._state

    @property
    def cmdsts(self) -> int:
        return self._cmdsts

    # ---- configuration -------------------------------------------------------------
    def wqcfg(self, wq_id: int) -> WqCfg:
        """WQCFG as the driver reads it back (with live state and occupancy)."""
        wq = self._wq(wq_id)
        with self._cv:
            return WqCfg(**{**_asdict(wq.cfg), "wq_state": wq.state, "occupancy": len(wq.queue)})

    def _wq_space_left(self, wq_id: int) -> int:
        """WQCAP's total size minus what the other WQs are configured with."""
        return self.config.total_wq_size - sum(w.cfg.wq_size for i, w in enumerate(self._wqs) if i != wq_id)

    def configure_wq(self, wq_id: int, cfg: WqCfg) -> None:
        """Write WQCFG (allowed while the WQ is disabled). A size beyond WQCAP's
        total is refused at once; while the device is enabled, so is a size that
        would make the WQs together exceed it (ENABLE_DEVICE checked the sum
        once, and no later write may break it)."""
        wq = self._wq(wq_id)
        with self._cv:
            if wq.state != WqState.DISABLED:
                raise DsaConfigError(f"WQ {wq_id} is enabled: WQCFG is read-only")
            total = self.config.total_wq_size
            if cfg.wq_size > total:
                raise DsaConfigError(f"WQ {wq_id} size {cfg.wq_size} exceeds the device's total of {total} "
                                     "(WQCAP)", CmdErr.WQ_SIZE_ERANGE)
            if self._state != DeviceState.DISABLED and cfg.wq_size > (left := self._wq_space_left(wq_id)):
                raise DsaConfigError(f"WQ {wq_id} size {cfg.wq_size}: the device is enabled and only {left} "
                                     f"of its {total} WQ entries (WQCAP) are not configured to other WQs",
                                     CmdErr.WQ_SIZE_ERANGE)
            wq.cfg = WqCfg(**{**_asdict(cfg), "wq_state": WqState.DISABLED, "occupancy": 0})

    def configure_group(self, group_id: int, wqs: Iterable[int], engines: Iterable[int]) -> None:
        """Write GRPCFG (allowed while the device is disabled)."""
        if not 0 <= group_id < len(self._groups):
            raise DsaConfigError(f"no group {group_id}")
        wq_set, eng_set = set(wqs), set(engines)
        if any(not 0 <= w < self.config.num_wqs for w in wq_set) or any(
                not 0 <= e < self.config.num_engines for e in eng_set):
            raise DsaConfigError("GRPCFG names a WQ or engine the device does not have")
        with self._cv:
            if self._state != DeviceState.DISABLED:
                raise DsaConfigError("device is enabled: GRPCFG is read-only")
            self._groups[group_id] = _Group(wq_set, eng_set)

    def grpcfg(self, group_id: int) -> bytes:
        g = self._groups[group_id]
        return grpcfg_pack(sum(1 << w for w in g.wqs), sum(1 << e for e in g.engines))

    def wq_occupancy(self, wq_id: int) -> int:
        with self._cv:
            return len(self._wq(wq_id).queue)

    # ---- commands ------------------------------------------------------------------
    def command(self, cmd: Cmd, operand: int = 0) -> int:
        """Write CMD and return CMDSTS (the model completes commands synchronously)."""
        handlers: dict[Cmd, Callable[[int], CmdErr | tuple[CmdErr, int]]] = {
            Cmd.ENABLE_DEVICE: lambda _: self.enable_device(),
            Cmd.DISABLE_DEVICE: lambda _: self.disable_device(),
            Cmd.DRAIN_ALL: lambda _: self.drain_all(),
            Cmd.ABORT_ALL: lambda _: self.abort_all(),
            Cmd.RESET_DEVICE: lambda _: self.reset_device(),
            Cmd.ENABLE_WQ: self.enable_wq,
            Cmd.DISABLE_WQ: self.disable_wq,
            Cmd.DRAIN_WQ: self.drain_wq,
            Cmd.ABORT_WQ: self.abort_wq,
            Cmd.RESET_WQ: self.reset_wq,
            Cmd.REQUEST_INT_HANDLE: self.request_int_handle,
            Cmd.RELEASE_INT_HANDLE: lambda _: CmdErr.SUCCESS,
        }
        handler = handlers.get(cmd)
        out = handler(operand) if handler is not None else CmdErr.INVAL_CMD
        err, result = out if isinstance(out, tuple) else (out, 0)
        self._cmdsts = cmdsts_encode(err, result)
        log.info("dsa.command", cmd=Cmd(cmd).name, operand=operand, err=CmdErr(err).name)
        return self._cmdsts

    def enable_device(self) -> CmdErr:
        with self._cv:
            if self._state != DeviceState.DISABLED:
                return CmdErr.DEV_ENABLED
            owner: dict[int, int] = {}
            engine_group: dict[int, int] = {}
            for gid, g in enumerate(self._groups):
                for w in g.wqs:
                    if w in owner:
                        return CmdErr.GRP_CONFIG  # a WQ in two groups
                    owner[w] = gid
                for e in g.engines:
                    if e in engine_group:
                        return CmdErr.GRP_CONFIG2  # an engine in two groups
                    engine_group[e] = gid
            if sum(wq.cfg.wq_size for wq in self._wqs) > self.config.total_wq_size:
                return CmdErr.WQ_SIZE_ERANGE
            self._engine_group = engine_group
            self._state = DeviceState.ENABLED
            self._stop = False
            self._threads = [threading.Thread(target=self._engine_loop, args=(e,),
                                              name=f"dsa-engine-{e}", daemon=True)
                             for e in sorted(engine_group)]
        for t in self._threads:
            t.start()
        return CmdErr.SUCCESS

    def disable_device(self) -> CmdErr:
        """Drain and disable every WQ, then stop the engines."""
        with self._cv:
            if self._state == DeviceState.DISABLED:
                return CmdErr.DIS_DEV_EN
            for wq in self._wqs:
                if wq.state == WqState.ENABLED:
                    wq.state = WqState.BUSY  # no new descriptors while draining
            self._cv.wait_for(lambda: all(not wq.queue and not wq.running for wq in self._wqs))
            for wq in self._wqs:
                wq.state = WqState.DISABLED
            self._stop = True
            self._state = DeviceState.DISABLED
            self._cv.notify_all()
            threads, self._threads = self._threads, []
        for t in threads:
            t.join()
        return CmdErr.SUCCESS

    def drain_all(self) -> CmdErr:
        with self._cv:
            self._cv.wait_for(lambda: all(not wq.queue and not wq.running for wq in self._wqs))
        return CmdErr.SUCCESS

    def abort_all(self) -> CmdErr:
        for wq in self._wqs:
            self._abort(wq)
        return CmdErr.SUCCESS

    def reset_device(self) -> CmdErr:
        """Abort everything, disable, and clear all configuration."""
        self.abort_all()
        if self._state != DeviceState.DISABLED:
            self.disable_device()
        with self._cv:
            for wq in self._wqs:
                wq.cfg = WqCfg()
            self._groups = [_Group() for _ in range(self.config.num_groups)]
        return CmdErr.SUCCESS

    def enable_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        gc = self.config.gencap
        with self._cv:
            wq = self._wqs[wq_id]
            cfg = wq.cfg
            if self._state != DeviceState.ENABLED:
                return CmdErr.DEV_NOTEN
            if wq.state != WqState.DISABLED:
                return CmdErr.WQ_ENABLED
            if cfg.wq_size == 0 or cfg.wq_thresh > cfg.wq_size or cfg.wq_size > self._wq_space_left(wq_id):
                return CmdErr.WQ_SIZE  # empty, threshold above size, or beyond WQCAP's total with the others
            if (cfg.dedicated and not self.config.dedicated_mode) or (
                    not cfg.dedicated and not self.config.shared_mode):
                return CmdErr.WQ_MODE
            if cfg.bof and not gc.block_on_fault:
                return CmdErr.BOF_EN
            if cfg.max_xfer_shift > gc.max_xfer_shift:
                return CmdErr.MAX_XFER_SIZE
            if cfg.max_batch_shift > gc.max_batch_shift:
                return CmdErr.MAX_BATCH_SIZE
            gid = next((g for g, grp in enumerate(self._groups) if wq_id in grp.wqs), None)
            if gid is None or not self._groups[gid].engines:
                return CmdErr.GRP_CONFIG  # a WQ no engine serves would never complete
            wq.state = WqState.ENABLED
        return CmdErr.SUCCESS

    def disable_wq(self, wq_id: int) -> CmdErr:
        """Stop accepting, let queued descriptors complete, then disable."""
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        with self._cv:
            wq = self._wqs[wq_id]
            if wq.state == WqState.DISABLED:
                return CmdErr.WQ_NOT_EN
            wq.state = WqState.BUSY
            self._cv.wait_for(lambda: not wq.queue and not wq.running)
            wq.state = WqState.DISABLED
        return CmdErr.SUCCESS

    def drain_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        wq = self._wqs[wq_id]
        with self._cv:
            self._cv.wait_for(lambda: not wq.queue and not wq.running)
        return CmdErr.SUCCESS

    def abort_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        self._abort(self._wqs[wq_id])
        return CmdErr.SUCCESS

    def reset_wq(self, wq_id: int) -> CmdErr:
        if not 0 <= wq_id < len(self._wqs):
            return CmdErr.INVAL_WQIDX
        wq = self._wqs[wq_id]
        self._abort(wq)
        with self._cv:
            wq.state = WqState.DISABLED
            wq.cfg = WqCfg()
        return CmdErr.SUCCESS

    def request_int_handle(self, index: int) -> tuple[CmdErr, int]:
        """Interrupt handles are the MSI-X vector indices themselves."""
        if not 0 <= index < self.config.num_int_handles:
            return CmdErr.INVAL_INT_IDX, 0
        return CmdErr.SUCCESS, index

    def _abort(self, wq: _WorkQueue) -> None:
        """Throw away queued descriptors (no record: the driver marks them
        aborted) and wait for the running ones."""
        with self._cv:
            dropped = len(wq.queue)
            wq.queue.clear()
            self._cv.wait_for(lambda: not wq.running)
            self._cv.notify_all()
        self.counters.add("aborted", dropped)

    def close(self) -> None:
        """Stop the engines (tests and service shutdown)."""
        if self._state != DeviceState.DISABLED:
            self.abort_all()
            self.disable_device()

