"""The scoring phase of a training step: rewards and perceptual features of the rollout's images, and the
perceptual statistics of the step (per-group entropies and diversity in every space, the regulariser's
per-sample surprisal, the whole batch's kNN entropy and a bank of earlier steps' features).

`Scorer` scores in micro-batches: `submit(images, prompts)` takes one chunk as soon as it exists and
`collect()` returns the step's rewards and features, concatenated in submission order. Chunks are the
rollout's micro-batches of `train.micro_batch` images: bounded memory with real reward models, and the same
batch shapes whatever the number of processes (BLAS rounds a row by its batch).

Overlapped scoring (`--train.overlap_scoring`, the trainer passes `submit` to `pec.sampling.sample` as its
`on_decoded`): `submit` returns at once and the chunk is scored on one worker thread, chunk after chunk in
submission order, while the caller goes on sampling; on a GPU the worker runs on its own CUDA stream, which
waits for the images and which `collect` waits for. A reward with a non-blocking `submit` (the `http`
reward: its requests go out and the worker goes on to the perceptual features and the next chunk) is only
waited for in `collect`. The chunks, their order and every computation are those of the serial path, with the
caller's number of intra-op threads, so the scores and features are the same bit for bit; nothing mutable is
shared with the worker: each job gets its chunk and returns its results, and only the caller's thread touches
the list of pending jobs. Rewards and spaces are deterministic functions of their images (none draws from
the global generators) and the sampler draws only from its own generator, so running them concurrently
changes no random stream.

The worker is a daemon thread: a step abandoned mid-way (a SIGTERM while a slow reward scores) drops its
pending chunks and does not wait for the one being scored, and that chunk does not hold the process's exit,
so a preempted run checkpoints its last complete step and exits at once, as the serial path does.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import torch

from pec.config import Config
from pec.entropy import group_entropy
from pec.metrics import group_pairwise_distance
from pec.run_safety import zero_invalid
from pec_kernels import knn_entropy


class Pending(Protocol):
    """Scores on their way (`HttpReward.submit`'s): `result()` waits for them."""

    def result(self) -> torch.Tensor: ...


_Scored = tuple["torch.Tensor | Pending", dict[str, torch.Tensor], "torch.cuda.Event | None"]


class _Worker:
    """One daemon thread running submitted jobs in order (a ThreadPoolExecutor's threads would hold the
    interpreter's exit until an abandoned job ends)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="pec-scoring", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` after the jobs before it; its Future holds the result or the error."""
        future: Future = Future()
        self.jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # noqa: BLE001 - handed to whoever waits for the job
                    future.set_exception(err)

    def shutdown(self) -> None:
        """Stop after the jobs submitted so far, and wait for them."""
        self.jobs.put(None)
        self.thread.join()


class Scorer:
    """Rewards and perceptual features of a step's images (see the module docstring); `overlap`: score on a
    worker thread, started by the first `submit` (`close` stops it; a later `submit` starts another)."""

    def __init__(self, reward_fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
                 encoders: dict[str, torch.nn.Module], micro_batch: int, overlap: bool = False) -> None:
        self.reward_fn, self.encoders, self.micro_batch = reward_fn, encoders, micro_batch
        # A reward that answers later (the http reward's requests): the worker sends them and goes on.
        self.submit_reward = getattr(reward_fn, "submit", None) if overlap else None
        self.overlap = overlap
        self.worker: _Worker | None = None
        self.stream: torch.cuda.Stream | None = None  # the worker's CUDA stream, made on the first CUDA chunk
        self._pending: list[Future[_Scored] | _Scored] = []

    def submit(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Score one chunk of images (B_chunk, C, H, W) in [0, 1] (a video model's clips: (B_chunk, F, C, H, W),
        which its rewards and spaces take) with their prompts (no grad); with `overlap`, on the worker."""
        prompts = list(prompts)
        if not self.overlap:
            self._pending.append(self._score(images, prompts, None))
            return
        if self.worker is None:
            self.worker = _Worker()
        ready = None
        if images.is_cuda:
            ready = torch.cuda.Event()
            ready.record()  # the images are complete once the caller's stream gets here
            if self.stream is None:
                self.stream = torch.cuda.Stream(images.device)
        self._pending.append(self.worker.submit(self._score, images, prompts, ready, torch.get_num_threads()))

    def _score(self, images: torch.Tensor, prompts: list[str], ready: torch.cuda.Event | None,
               threads: int | None = None) -> _Scored:
        """One chunk's (reward, features, the event that ends their computation on the worker's stream), with
        `threads` intra-op threads (the caller's count)."""
        # A thread keeps the count it started with, and BLAS and reductions may round by the count: the worker
        # follows the caller's (--threads, or a later torch.set_num_threads), so its results are the serial path's.
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if ready is None:
            return *self._compute(images, prompts), None
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            images.record_stream(self.stream)  # the caller may free the images before this stream reads them
            reward, feats = self._compute(images, prompts)
            done = torch.cuda.Event()
            done.record(self.stream)
        return reward, feats, done

    def _compute(self, images: torch.Tensor, prompts: list[str]
                 ) -> tuple[torch.Tensor | Pending, dict[str, torch.Tensor]]:
        with torch.no_grad():  # thread-local: the worker sets its own
            reward = (self.submit_reward(images, prompts) if self.submit_reward is not None
                      else self.reward_fn(images, prompts).float())
            feats = {name: encoder(images).float() for name, encoder in self.encoders.items()}
        return reward, feats

    def collect(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The rewards (B,) and (B, D) features in each space of every chunk submitted since the last call
        (waiting for the worker, and raising the first error of a chunk)."""
        rewards: list[torch.Tensor] = []
        feats: dict[str, list[torch.Tensor]] = {name: [] for name in self.encoders}
        for job in self._pending:  # kept until every chunk is in, for `discard` if the wait is interrupted
            reward, chunk_feats, done = job.result() if isinstance(job, Future) else job
            if not isinstance(reward, torch.Tensor):
                reward = reward.result().float()
            if done is not None:  # the caller's stream uses the worker's results from here on
                stream = torch.cuda.current_stream()
                stream.wait_event(done)
                for t in (reward, *chunk_feats.values()):
                    t.record_stream(stream)
            rewards.append(reward)
            for name, f in chunk_feats.items():
                feats[name].append(f)
        self._pending = []
        return torch.cat(rewards), {name: torch.cat(chunks) for name, chunks in feats.items()}

    def discard(self) -> None:
        """Drop the chunks submitted since the last `collect` (a step abandoned mid-way): those not started are
        cancelled, and the one being scored is left to end on the worker, unwaited (its result and its error
        belong to the abandoned step); the worker is let go, so the next `submit` starts another."""
        pending, self._pending = self._pending, []
        for job in pending:
            if isinstance(job, Future):
                job.cancel()
        if self.worker is not None and any(isinstance(job, Future) for job in pending):
            self.worker.jobs.put(None)  # ends after the running chunk; a daemon, so it never holds the exit
            self.worker = None

    def close(self) -> None:
        """Drop what a step left (`discard`) and stop the worker thread."""
        self.discard()
        if self.worker is not None:
            self.worker.shutdown()
            self.worker = None

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`submit` every micro-batch of `images`, then `collect`."""
        for start in range(0, images.shape[0], self.micro_batch):
            chunk = slice(start, start + self.micro_batch)
            self.submit(images[chunk], prompts[chunk])
        return self.collect()


class PerceptualStats:
    """A step's perceptual statistics over its global batch (see the module docstring).

    gather: all-gather of per-sample rows into the global order (the identity with one process);
    spread: whether prompt groups are spread over processes (their features are then gathered, and every
    rank computes every group); index: this rank's global sample indices. The bank of the last
    `perceptual.bank_steps` steps' features is checkpointed (`state_dict`).
    """

    def __init__(self, cfg: Config, gather: Callable[[torch.Tensor], torch.Tensor],
                 gather_rows: Callable[[torch.Tensor], torch.Tensor], spread: bool, index: torch.Tensor) -> None:
        self.cfg, self.gather, self.gather_rows, self.spread, self.index = cfg, gather, gather_rows, spread, index
        # The regulariser space's features of the last bank_steps steps (whole batches, masked rows zeroed)
        # and their validity masks.
        self.bank: list[torch.Tensor] = []
        self.bank_valid: list[torch.Tensor] = []

    def per_group(self, feats: dict[str, torch.Tensor], valid: torch.Tensor
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-group perceptual entropies (kNN and Gaussian) and within-group diversity in each space over
        the valid samples, and the regulariser's per-sample surprisal in `perceptual.space` (0 for
        invalid samples). `feats` hold whole groups of `sampling.group_size` consecutive samples;
        `valid` is their (B,) mask on the device, which the estimators take as it is (no host read).
        Returns ({key: (G,) tensor}, surprisal (B,))."""
        p, n = self.cfg.perceptual, self.cfg.sampling.group_size
        group_mask = valid.reshape(-1, n)
        per_group: dict[str, torch.Tensor] = {}
        surprisal = None
        for name, f in feats.items():
            groups = f.reshape(-1, n, f.shape[-1])
            knn = group_entropy(groups, estimator="knn", k=p.k, per_dim=p.per_dim, valid=group_mask,
                                check_finite=False)
            gauss = group_entropy(groups, estimator="gaussian", per_dim=p.per_dim, valid=group_mask,
                                  check_finite=False)
            per_group[f"perc_knn/{name}"] = knn.entropy.double()
            per_group[f"perc_gauss/{name}"] = gauss.entropy.double()
            per_group[f"diversity/{name}"] = group_pairwise_distance(groups, group_mask)
            if name == p.space:
                surprisal = (knn if p.estimator == "knn" else gauss).surprisal.reshape(-1)
        return per_group, surprisal

    def step(self, feats: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`per_group` over the step's global batch, laid out by `dist.placement`: the logged means over
        valid groups (0-dim tensors, identical on every rank) and this rank's surprisal; with
        `perceptual.batch_metric`/`bank_steps`/`scope batch`, the kNN entropy of the whole batch too.
        `feats` are this rank's rows, `valid` the global (B,) mask."""
        p = self.cfg.perceptual
        index = self.index
        gathered: dict[str, torch.Tensor] = {}
        if self.spread:
            # A group lives on every rank: gather each space's features, and every rank computes all groups.
            gathered = {name: self.gather(f) for name, f in feats.items()}
            per_group, surprisal = self.per_group(gathered, valid)
        else:
            per_group, surprisal = self.per_group(feats, valid[index])
            keys = list(per_group)
            stacked = self.gather_rows(torch.stack([per_group[k] for k in keys], dim=1))
            per_group = {k: stacked[:, i] for i, k in enumerate(keys)}
        group_ok = valid.reshape(-1, self.cfg.sampling.group_size).any(dim=1).double()
        n_ok = group_ok.sum().clamp_min(1)
        row = {k: (v * group_ok).sum() / n_ok for k, v in per_group.items()}
        if p.batch_metric or p.bank_steps or p.scope == "batch":
            whole = gathered.get(p.space)
            if whole is None:
                whole = self.gather(feats[p.space])
            batch_row, batch_surprisal = self.batch_entropy(whole, valid)
            row.update(batch_row)
            if p.scope == "batch":
                return row, batch_surprisal[index]
        return row, surprisal[index] if self.spread else surprisal

    def batch_entropy(self, feats: torch.Tensor, valid: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The kNN entropy of the regulariser's space over the step's valid samples (B, D) (`valid` (B,) on
        the device), as one masked group, and against the bank of earlier steps' features; returns the
        logged values and the per-sample batch surprisal (B,) (0 for invalid samples). This is the
        large-N case the fused kNN kernel exists for. No host read: with fewer than k + 1 valid samples
        (every group masked) the batch entropy is 0, and so is the bank entropy with fewer than k valid
        bank rows."""
        p = self.cfg.perceptual
        out: dict[str, torch.Tensor] = {}
        normalize = "per_dim" if p.per_dim else "none"
        surprisal = torch.zeros(feats.shape[0], dtype=torch.float32, device=feats.device)
        if feats.shape[0] > p.k:
            batch = knn_entropy(feats, k=p.k, valid=valid, normalize=normalize, check_finite=False)
            surprisal = batch.surprisal
            out[f"perc_knn_batch/{p.space}"] = batch.entropy
        if p.bank_steps:
            if self.bank:
                bank = torch.cat(self.bank)
                if bank.shape[0] >= p.k:
                    against = knn_entropy(feats, k=p.k, reference=bank, valid=valid,
                                          reference_valid=torch.cat(self.bank_valid), normalize=normalize,
                                          check_finite=False)
                    out[f"perc_knn_bank/{p.space}"] = against.entropy
            # Masked rows are zeroed: the bank is checkpointed, and NaN must not reach a later step.
            self.bank = (self.bank + [zero_invalid(feats.detach(), valid)])[-p.bank_steps:]
            self.bank_valid = (self.bank_valid + [valid])[-p.bank_steps:]
        return out, surprisal

    def state_dict(self) -> dict[str, Any]:
        """The bank, for the checkpoint (CPU tensors)."""
        return {"bank": [b.cpu() for b in self.bank], "bank_valid": [v.cpu() for v in self.bank_valid]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore `state_dict()` onto `device` (checkpoints from before the masks held only valid rows)."""
        self.bank = [b.to(device) for b in state.get("bank", [])]
        self.bank_valid = [v.to(device) for v in state.get(
            "bank_valid", [torch.ones(b.shape[0], dtype=torch.bool) for b in self.bank])]
