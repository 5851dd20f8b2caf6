"""Continuous batching for Performer decoders: concurrent requests decode together, each with its
own state.

transformers' continuous batching keeps a paged key/value cache for full and sliding-window
attention, which has no place for a recurrent state. A Performer decoder does not need pages: a
linear layer's state (with its window buffer and sparse cache) has the same size whatever the
request's length, so the running batch is one `PerformerCache` whose rows are the requests.

- A request is prefilled alone, in chunks of `prefill_chunk` tokens, one chunk between two
  decoding steps of the running batch: a long prompt does not stall the others for its length.
  With no row decoding, the whole prompt goes in one forward, as generate() does it.
- Once prefilled, its cache joins the batch as a new row (`join_rows`); each decoding step runs
  the whole batch one token forward, every row at its own position.
- A finished or cancelled request leaves at once (`keep_rows`): its row is dropped, and nothing
  of it is kept, so memory follows the batch, not the tokens served.
- Softmax layers (hybrid stacks) keep their keys and values padded on the left to the longest
  row, with a padding mask; leaving rows shrink them again.

Each row is the request alone: its answer is what `generate()` gives it by itself (greedy, or
sampled with the request's own random generator, so another request never changes its draws).

`PerformerBatchManager` has the interface of transformers' `ContinuousBatchingManager` that
`transformers serve --continuous-batching` and `generate_batch` use (`add_request`,
`cancel_request`, `get_result`, `request_id_iter`, `start`, `stop`, ...), and it reports results as
transformers' `GenerationOutput`: `PerformerForCausalLM.init_continuous_batching` returns it.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus
from transformers.utils import logging

from .cache_performer import PerformerCache

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------
# The batch cache: rows joined and dropped


def _is_key_values(state) -> bool:
    """A softmax layer's (keys, values), as opposed to a linear layer's named state."""
    return state is not None and not hasattr(state, "_fields") and len(state) == 2


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, length, D], zeros before."""
    missing = length - tensor.shape[2]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros(*tensor.shape[:2], missing, tensor.shape[3]), tensor], dim=2)


def join_rows(batch: Optional[PerformerCache], row: PerformerCache, length: int) -> PerformerCache:
    """`batch` with `row`'s requests appended as further rows (None: `row` alone). Linear states are
    concatenated as they are (their sizes never depend on the length); softmax keys/values are
    padded on the left to `length`, the batch's padded key length after the join."""
    if batch is None:
        batch = PerformerCache(len(row.layers))
    for index, new in enumerate(row.layers):
        old = batch.layer(index)
        if new.cross_attention is not None:
            raise ValueError("continuous batching serves decoder-only models: this cache holds cross-attention")
        state, extra = old.self_attention, new.self_attention
        if state is None:
            old.self_attention = tuple(_pad_left(t, length) for t in extra) if _is_key_values(extra) else extra
        elif _is_key_values(extra):
            old.self_attention = tuple(torch.cat([_pad_left(a, length), _pad_left(b, length)])
                                       for a, b in zip(state, extra))
        else:
            old.self_attention = type(state)(*(torch.cat([a, b]) for a, b in zip(state, extra)))
    return batch


def keep_rows(batch: PerformerCache, rows: torch.Tensor, start: int) -> None:
    """Keeps only `rows` (indices) of the batch, in that order; softmax keys/values from key position
    `start` on (the columns before it are padding in every row kept)."""
    for layer in batch.layers:
        state = layer.self_attention
        if state is None:
            continue
        kept = [t.index_select(0, rows.to(t.device)) for t in state]
        if _is_key_values(state):
            kept = [t[:, :, start:].contiguous() for t in kept]
        layer.self_attention = type(state)(*kept) if hasattr(state, "_fields") else tuple(kept)


# --------------------------------------------------------------------------------------------
# Requests


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    eos: set[int]
    streaming: bool
    processors: Any  # the LogitsProcessorList generate() would apply (the model's settings and the request's)
    generator: Optional[torch.Generator]  # None: greedy
    stop_criteria: Optional[Callable] = None
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens absorbed so far
    cache: Optional[PerformerCache] = None  # its own cache while it prefills
    created: float = field(default_factory=time.perf_counter)
    started: float = -1.0

    def output(self, status: RequestStatus, error: Optional[str] = None) -> GenerationOutput:
        return GenerationOutput(request_id=self.request_id, prompt_ids=list(self.prompt),
                                generated_tokens=list(self.generated), error=error, status=status,
                                created_time=self.created,
                                lifespan=(self.started, time.perf_counter() if status >= RequestStatus.FINISHED else -1))

    def finished(self) -> bool:
        if not self.generated:
            return False
        if self.generated[-1] in self.eos or len(self.generated) >= self.max_new_tokens:
            return True
        if self.stop_criteria is not None:
            ids = torch.tensor([self.prompt + self.generated])
            return bool(self.stop_criteria(ids, None).any())
        return False


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return {int(i) for i in ids if i is not None and int(i) >= 0}


def _request_config(generation_config, sampling: dict):
    """What a request generates with: the model's generation config (repetition penalty and the
    rest, as generate() applies them), with the request's temperature / top_k / top_p on top where
    it gives them; top_k=1 or temperature 0 is greedy, as the server sends it."""
    config = copy.deepcopy(generation_config)
    if sampling.get("top_k") == 1 or sampling.get("temperature") == 0:
        config.do_sample = False
    elif sampling:
        config.do_sample = True
        for name, value in sampling.items():
            setattr(config, name, value)
    return config


def _next_token(logits: torch.Tensor, request: _Request) -> int:
    """logits: [V] fp32, the request's last position -> its next token, as generate() picks it: the
    processors on the request's ids so far, then the argmax or a draw from its own generator."""
    scores = logits[None]
    if request.processors:
        ids = torch.tensor([request.prompt + request.generated], device=logits.device)
        scores = request.processors(ids, scores)
    if request.generator is None:
        return int(scores.argmax())
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=request.generator))


# --------------------------------------------------------------------------------------------
# The manager


class _ThreadStatus:
    """What the server reads of the batching thread: the error that stopped it, if any."""

    def __init__(self):
        self.fatal_error: Optional[BaseException] = None
        self.stopping = False

    def can_accept_new_requests(self) -> Optional[str]:
        if self.fatal_error is not None:
            return f"The batching thread stopped: {self.fatal_error}"
        if self.stopping:
            return "The batching manager is stopping"
        return None


class _Occupancy:
    """The batch's occupancy, as the server's stats line reads it (`batch_processor.cache` and
    `batch_processor.scheduler`)."""

    def __init__(self, manager: "PerformerBatchManager"):
        self.manager = manager
        self.cache = self
        self.scheduler = self

    def compute_free_capacity(self) -> float:
        return 1 - len(self.manager._running) / self.manager.max_batch_size

    @property
    def active_requests(self) -> dict:
        prefilling = self.manager._prefilling
        running = dict(list(self.manager._running.items()))
        return running if prefilling is None else {**running, prefilling.request_id: prefilling}

    @property
    def waiting_requests(self) -> dict:
        return {r.request_id: r for r in list(self.manager._waiting)}


class _LogitProcessor:
    """The per-request settings `add_request` takes, with their types (what the server asks for)."""

    supported_keys = {"temperature": float, "top_k": int, "top_p": float}


class PerformerBatchManager:
    """Continuous batching of a `PerformerForCausalLM` (see the module docstring).

    max_batch_size: the most requests decoding at once (others wait); prefill_chunk: the prompt
    tokens absorbed between two decoding steps of the batch (a multiple of the model's chunk size
    keeps the chunked kernel's blocks where a single prefill has them)."""

    warmed_up = True  # nothing to capture: the first step is the warm-up
    accepts_stop_criteria = True  # `add_request(stop_criteria=...)`: a StoppingCriteria on the ids so far

    def __init__(self, model, generation_config=None, max_batch_size: int = 32, prefill_chunk: Optional[int] = None):
        if not getattr(model.config, "is_decoder", False) or getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("continuous batching serves decoder-only Performer models (PerformerForCausalLM)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        chunk = model.config.chunk_size
        prefill_chunk = prefill_chunk or 8 * chunk
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.model = model
        self.generation_config = generation_config if generation_config is not None else model.generation_config
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.hybrid = any(layer.self_attn.attention_type == "softmax" for layer in model.model.decoder.layers)
        self.background_thread_status = _ThreadStatus()
        self.logit_processor = _LogitProcessor()
        self.batch_processor = _Occupancy(self)
        self.input_queue: queue.Queue = queue.Queue()
        self.cancel_queue: queue.Queue = queue.Queue()
        self.output_queue: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._counter = 0
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._prefilling: Optional[_Request] = None
        self._running: "OrderedDict[str, _Request]" = OrderedDict()  # in the batch cache's row order
        self._cache: Optional[PerformerCache] = None
        self._key_mask: Optional[torch.Tensor] = None  # [N, S] the softmax layers' real keys (hybrid stacks)
        self._tokens: Optional[torch.Tensor] = None  # [N, 1] each row's next input

    # -- the interface of transformers' ContinuousBatchingManager --------------------------------

    def warmup(self) -> None:
        pass

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.is_running():
            return
        self.background_thread_status.stopping = False
        self._thread = threading.Thread(target=self._loop, name="performer-batching", daemon=True)
        self._thread.start()

    def stop(self, block: bool = True, timeout: Optional[float] = None, keep_for_next_session: bool = False) -> None:
        self.background_thread_status.stopping = True
        self._wake.set()
        if block and self._thread is not None:
            self._thread.join(timeout)

    def join(self, stop_trigger_time: float = 0.0, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def destroy(self) -> None:
        self.stop(block=True)
        self._cache = self._key_mask = self._tokens = None

    def add_request(self, input_ids: list[int], request_id: Optional[str] = None, max_new_tokens: Optional[int] = None,
                    streaming: bool = False, record_timestamps: bool = False, eos_token_id=None,
                    stop_criteria: Optional[Callable] = None, **sampling: Any) -> Optional[str]:
        """Queues a request; its results come out of `get_result` (a `GenerationOutput` per new token
        when streaming, one at the end otherwise). Sampling settings: temperature, top_k, top_p (none:
        the model's generation config, which also gives every other setting, e.g. a repetition
        penalty, as generate() applies it); max_new_tokens below 1 is refused (ValueError), as
        generate() refuses it. The request's random generator is seeded here from torch's
        global one, so that a seed set just before (as the server does per request) fixes its draws."""
        denial = self.background_thread_status.can_accept_new_requests()
        if denial is not None:
            raise RuntimeError(denial)
        unknown = set(sampling) - set(self.logit_processor.supported_keys)
        if unknown:
            raise ValueError(f"continuous batching takes {sorted(self.logit_processor.supported_keys)} per request, "
                             f"not {sorted(unknown)}")
        with self._lock:
            if request_id is None:
                request_id = f"req_{self._counter}"
            self._counter += 1
        config = _request_config(self.generation_config, sampling)
        max_new_tokens = max_new_tokens if max_new_tokens is not None else (config.max_new_tokens or 20)
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        prompt = [int(t) for t in input_ids]
        processors = self.model._get_logits_processor(config, input_ids_seq_length=len(prompt),
                                                      encoder_input_ids=torch.tensor([prompt or [0]]),
                                                      device=self.model.device)
        generator = None
        if config.do_sample:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        eos = _eos_set(eos_token_id if eos_token_id is not None else config.eos_token_id)
        request = _Request(str(request_id), prompt, int(max_new_tokens), eos, streaming, processors, generator,
                           stop_criteria)
        self.input_queue.put(request)
        self._wake.set()
        return request.request_id

    def add_requests(self, inputs: list[list[int]], max_new_tokens: Optional[int] = None, streaming: bool = False,
                     record_timestamps: bool = False, **sampling: Any) -> list[str]:
        return [self.add_request(ids, max_new_tokens=max_new_tokens, streaming=streaming, **sampling) for ids in inputs]

    def cancel_request(self, request_id: str) -> None:
        self.cancel_queue.put(str(request_id))
        self._wake.set()

    def get_result(self, request_id: Optional[str] = None, timeout: Optional[float] = None) -> Optional[GenerationOutput]:
        if self.output_queue.empty() and (self._thread is None or self.background_thread_status.fatal_error):
            return None
        try:
            result = self.output_queue.get(block=True, timeout=timeout)
        except queue.Empty:
            return None
        if request_id is not None and result.request_id != request_id:
            self.output_queue.put(result)
            return None
        return result

    def __iter__(self):
        while self.is_running() or not self.output_queue.empty():
            result = self.get_result(timeout=0.1)
            if result is not None:
                yield result

    def request_id_iter(self, request_id: str):
        while self.is_running():
            result = self.get_result(request_id=request_id, timeout=0.1)
            if result is not None:
                yield result
                if result.is_finished():
                    return

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self.background_thread_status.stopping:
                    self._take_queued()
                    if self._prefilling is None and self._waiting and len(self._running) < self.max_batch_size:
                        self._prefilling = self._waiting.popleft()
                        self._prefilling.started = time.perf_counter()
                    if self._prefilling is None and not self._running:
                        self._wake.wait(0.05)
                        self._wake.clear()
                        continue
                    if self._prefilling is not None:
                        self._prefill_chunk(self._prefilling)
                    if self._running:
                        self._decode_step()
        except BaseException as error:  # the loop cannot go on: every request gets the error
            logger.exception("The Performer batching loop failed")
            self.background_thread_status.fatal_error = error
            for request in [*self._waiting, *([self._prefilling] if self._prefilling else []), *self._running.values()]:
                self.output_queue.put(request.output(RequestStatus.FAILED, f"{type(error).__name__}: {error}"))
            raise

    def _take_queued(self) -> None:
        while True:
            try:
                self._waiting.append(self.input_queue.get_nowait())
            except queue.Empty:
                break
        cancelled = set()
        while True:
            try:
                cancelled.add(self.cancel_queue.get_nowait())
            except queue.Empty:
                break
        if not cancelled:
            return
        self._waiting = deque(r for r in self._waiting if r.request_id not in cancelled)
        if self._prefilling is not None and self._prefilling.request_id in cancelled:
            self._prefilling = None
        gone = [rid for rid in self._running if rid in cancelled]
        if gone:
            self._leave(gone)

    def _fail(self, request: _Request, error: Exception) -> None:
        self.output_queue.put(request.output(RequestStatus.FAILED, f"{type(error).__name__}: {error}"))

    def _emit(self, request: _Request) -> bool:
        """Sends the request's news; -> whether it has finished."""
        done = request.finished()
        if done:
            self.output_queue.put(request.output(RequestStatus.FINISHED))
        elif request.streaming:
            self.output_queue.put(request.output(RequestStatus.DECODING))
        return done

    def _prefill_chunk(self, request: _Request) -> None:
        """Absorbs the request's next prompt chunk into its own cache; after the last, its first token
        is drawn and it joins the batch (or ends there)."""
        try:
            if request.prefilled == 0:
                self._check_prompt(request)
            # With no row decoding there is nobody to stall: the whole prompt at once, as generate() does.
            chunk = self.prefill_chunk if self._running else len(request.prompt)
            end = min(request.prefilled + chunk, len(request.prompt))
            ids = torch.tensor([request.prompt[request.prefilled:end]], device=self.model.device)
            out = self.model(input_ids=ids, cache=request.cache, use_cache=True, logits_to_keep=1)
        except Exception as error:  # the request's fault (or its alone): it fails, the batch goes on
            self._prefilling = None
            self._fail(request, error)
            return
        request.cache, request.prefilled = out.cache, end
        if end < len(request.prompt):
            return
        self._prefilling = None
        request.generated.append(_next_token(out.logits[0, -1].float(), request))
        if self._emit(request):
            return
        self._join(request)

    def _check_prompt(self, request: _Request) -> None:
        if not request.prompt:
            raise ValueError("the prompt is empty")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if self.model.config.position_embedding_type == "learned" and limit and len(request.prompt) > limit:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; the model has {limit} positions")
        vocab = self.model.config.vocab_size
        if min(request.prompt) < 0 or max(request.prompt) >= vocab:
            raise ValueError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")

    def _join(self, request: _Request) -> None:
        row, request.cache = request.cache, None
        length = 0
        if self.hybrid:
            prompt = len(request.prompt)
            length = max(prompt, self._key_mask.shape[1] if self._key_mask is not None else 0)
            mask = torch.zeros(1, length, dtype=torch.bool, device=self.model.device)
            mask[:, length - prompt:] = True
            old = self._key_mask
            if old is not None:
                old = torch.cat([old.new_zeros(old.shape[0], length - old.shape[1]), old], dim=1)
            self._key_mask = mask if old is None else torch.cat([old, mask])
        token = torch.tensor([[request.generated[-1]]], device=self.model.device)
        self._cache = join_rows(self._cache, row, length)
        self._tokens = token if self._tokens is None else torch.cat([self._tokens, token])
        self._running[request.request_id] = request

    def _leave(self, request_ids: list[str]) -> None:
        """Drops these requests' rows from the batch (and the softmax keys no row needs any more)."""
        ids = list(self._running)
        keep = [i for i, rid in enumerate(ids) if rid not in request_ids]
        for rid in request_ids:
            self._running.pop(rid, None)
        if not keep:
            self._cache = self._key_mask = self._tokens = None
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.model.device)
        start = 0
        if self._key_mask is not None:
            mask = self._key_mask.index_select(0, rows)
            start = int(mask.any(0).nonzero()[0]) if mask.any() else mask.shape[1]
            self._key_mask = mask[:, start:]
        keep_rows(self._cache, rows, start)
        self._tokens = self._tokens.index_select(0, rows)

    def _decode_step(self) -> None:
        requests = list(self._running.values())
        positions = torch.tensor([[len(r.prompt) + len(r.generated) - 1] for r in requests], device=self.model.device)
        mask = None
        if self._key_mask is not None:  # the softmax layers' keys: the padded past and this step's
            mask = torch.cat([self._key_mask, self._key_mask.new_ones(len(requests), 1)], dim=1)
        # The tokens the batch cache holds, as the forward reads them: the softmax layers' padded key
        # length (hybrid stacks), else the longest row (linear layers' states know their own).
        self._cache.set_seq_length(self._key_mask.shape[1] if self._key_mask is not None else int(positions.max()))
        try:
            out = self.model(input_ids=self._tokens, position_ids=positions, attention_mask=mask, cache=self._cache,
                             use_cache=True)
        except Exception as error:  # a step of the batch failed: its requests fail, the next ones are served
            logger.exception("A batched decoding step failed")
            for request in requests:
                self._fail(request, error)
            self._running.clear()
            self._cache = self._key_mask = self._tokens = None
            return
        if mask is not None:
            self._key_mask = mask
        logits = out.logits[:, -1].float()
        done = []
        for row, request in enumerate(requests):
            request.generated.append(_next_token(logits[row], request))
            self._tokens[row, 0] = request.generated[-1]
            if self._emit(request):
                done.append(request.request_id)
        if done:
            self._leave(done)
