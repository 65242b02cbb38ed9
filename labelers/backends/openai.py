"""OpenAI-compatible completions server backend (`vllm serve`, and others that echo prompt log-probs).

Each pair goes to `/v1/completions` as a token-id prompt with
`echo=true, logprobs=0, max_tokens=0`: the server returns the log-prob of
every prompt token (the first is null) and generates nothing. Requests carry
several prompts each and run on a bounded thread pool.

Failures: connection errors, timeouts, 429 and 5xx are retried with
exponential back-off (tenacity) for up to `max_retry_seconds`, so a server
that restarts mid-job costs time, not labels; giving up is one `BackendError`
naming the server and the last error. Any other 4xx means the request itself
is wrong (prompt too long, unknown model): it stops the job at once with the
server's own message. The back-off sleeps wait on an event that an interrupt
(Ctrl-C) or a failed request sets, so no retry outlives the call. The API key is read from the environment
variable named by `api_key_env` and never logged.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from tenacity import (Retrying, before_sleep_log, retry_if_exception, stop_after_delay, stop_when_event_set,
                      wait_exponential)

from .base import GREEDY, BackendError, Sampling, Score, check_pairs, cut_at_stop

logger = logging.getLogger(__name__)


@dataclass
class OpenAIBackendConfig:
    model: str                           # the served model's name (vLLM: the path given to --model)
    base_url: str = "http://localhost:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key, if any
    concurrency: int = 4                 # requests in flight
    prompts_per_request: int = 8
    timeout: float = 300.0               # seconds per request
    max_retry_seconds: float = 600.0     # give up on a request after retrying this long


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code == 429 or exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)  # connection refused/reset, timeouts


class _Stopped(Exception):
    """The call was abandoned (interrupt, or another request failed): stop retrying."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {_server_message(exc.response)}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message", error) if isinstance(error, dict) else error
        return str(message)
    except ValueError:
        return response.text[:500]


class OpenAIBackend:
    name = "openai"

    def __init__(self, cfg: OpenAIBackendConfig):
        self.cfg = cfg
        headers = {}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout,
                                   limits=limits)
        self._stop = threading.Event()

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _post(self, payload: dict) -> dict:
        """One request, retried while the failure is transient; giving up is a one-line BackendError."""
        retrying = Retrying(retry=retry_if_exception(_retryable), wait=wait_exponential(multiplier=0.5, max=20),
                            stop=stop_after_delay(self.cfg.max_retry_seconds) | stop_when_event_set(self._stop),
                            reraise=True, sleep=self._sleep, before_sleep=before_sleep_log(logger, logging.WARNING))
        try:
            return retrying(self._post_once, payload)
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            if self._stop.is_set():
                raise _Stopped from None
            raise BackendError(f"{self.cfg.base_url}: gave up after retrying for {self.cfg.max_retry_seconds:g} s "
                               f"(--max-retry-seconds); last error: {_describe(exc)}") from None

    def close(self) -> None:
        self.client.close()

    def _post_once(self, payload: dict) -> dict:
        response = self.client.post("/completions", json=payload)
        if response.status_code >= 400:
            if _retryable(httpx.HTTPStatusError("", request=response.request, response=response)):
                response.raise_for_status()
            raise BackendError(f"{self.cfg.base_url} refused the request (HTTP {response.status_code}): "
                               f"{_server_message(response)}")
        return response.json()

    def _completions(self, prompts: list[list[int]], n: int = 1, seeds: list[int] | None = None,
                     **options) -> list[dict]:
        """`n` choices per prompt, in order, over the pool; the first refusal stops everything. With
        `seeds`, one prompt per request (a request has one seed), so each prompt's samples are its own."""
        size = 1 if seeds is not None else max(1, self.cfg.prompts_per_request)
        requests = [prompts[i:i + size] for i in range(0, len(prompts), size)]

        def send(k: int, batch: list[list[int]]) -> list[dict]:
            extra = {"n": n} if n > 1 else {}
            if seeds is not None:
                extra["seed"] = seeds[k]
            body = self._post({"model": self.cfg.model, "prompt": batch, **options, **extra})
            choices = sorted(body["choices"], key=lambda c: c["index"])  # prompt i's j-th is index i*n + j
            if len(choices) != len(batch) * n:
                raise BackendError(f"server answered {len(choices)} choices for {len(batch)} prompts x {n}")
            return choices

        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency))
        futures = [pool.submit(send, k, batch) for k, batch in enumerate(requests)]
        try:
            return [choice for future in futures for choice in future.result()]
        except BaseException:
            # Ctrl-C or a failed request: wake every back-off sleep and drop queued requests, without waiting
            self._stop.set()
            for future in futures:
                future.cancel()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def score(self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> list[Score]:
        check_pairs(prompts, continuations)
        if not prompts:  # an empty chunk: nothing to score (not an index error deep in a batch)
            return []
        sequences = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        choices = self._completions(sequences, echo=True, logprobs=0, max_tokens=0, temperature=0.0)
        scores = []
        for sequence, prompt, choice in zip(sequences, prompts, choices):
            logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
            if logprobs is None or len(logprobs) < len(sequence):
                raise BackendError(f"{self.cfg.base_url} did not echo the prompt's log-probs "
                                   "(it needs echo=true with logprobs, as vLLM's server offers)")
            tail = logprobs[len(prompt):len(sequence)]
            scores.append(Score(float(sum(tail)), len(sequence) - len(prompt)))
        return scores

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY) -> list[list[str]]:
        if not prompts:
            return []
        options = dict(max_tokens=max_new_tokens, temperature=sampling.temperature)
        if sampling.stop:
            options.update(stop=list(sampling.stop))
        seeds = None
        if not sampling.greedy:
            options.update(top_p=sampling.top_p)
            seeds = [sampling.prompt_seed(i) for i in range(len(prompts))]
        choices = self._completions([list(p) for p in prompts], n=sampling.n, seeds=seeds, **options)
        n = sampling.n
        return [[cut_at_stop(c["text"], sampling.stop).strip() for c in choices[i * n:(i + 1) * n]]
                for i in range(len(prompts))]
