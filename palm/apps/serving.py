"""The MLflow pyfunc model of an export: what ``mlflow.pyfunc.load_model("models:/palm-chat@champion")``
and ``mlflow models serve`` run.

:func:`palm.ops.registry.register` logs this file as the model's code ("models from code": MLflow
runs the file to get the model, nothing is unpickled), the export folder as the artifact
``model`` and this package beside it (``code_paths``), so a registered version loads wherever
its pip requirements are installed. The model is loaded whole into the process, in a
one-process world shared with the other models loaded in it and kept up while any of them lives
(:class:`palm.model.parallel.GroupHold`; or in the caller's world, if it has one): models loaded,
swapped and dropped in any order leave the others working.

``predict`` by kind of export:

* ``pretrain``: each input string is text to continue; returns the continuation;
* ``sft``, ``ppo``, ``dpo``: each input string is a user turn; returns the assistant's reply (the
  chat template of ``palm chat``). Or one OpenAI chat request, MLflow's chat format (what
  ``mlflow models serve`` hands on for a body ``{"messages": [...], "max_tokens": 16, ...}``):
  the conversation's next reply as a chat completion (``choices[0].message``, ``finish_reason``,
  ``usage``); ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``top_k``
  and ``seed`` in the request take the place of the params of the same meaning;
* ``reward``: each row's ``prompt`` (a user turn) and ``response`` (the reply) are scored at the
  reply's end of turn, normalised with the reward stage's mean and std (0: an average reply).

Generation settings come as params (:data:`palm.ops.registry.PARAMS`, the signature's param schema):
prompts are sampled together in chunks of :attr:`PalmModel.chunk_rows` rows
(:func:`palm.decode.generate.generate`; one seeded generator runs through the chunks in order),
prompts cut from the left to leave ``max_new_tokens`` of room.

One request cannot take the served model's memory: it may hold at most :attr:`PalmModel.max_rows`
rows and each text at most :attr:`PalmModel.max_chars` characters (more than the context of any
model here; a longer prompt would only be cut); past a cap the request is refused in one line
naming it, before anything is tokenized; a chat request holds at most :attr:`PalmModel.max_messages`
messages. Generation memory is that of one chunk, whatever the
number of rows.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import mlflow
import pandas as pd

from palm.ops.registry import PARAMS


def _texts(model_input: Any, column: str | int = 0) -> list[str]:
    """The strings of one column of a pyfunc input (a DataFrame after schema enforcement, or a
    plain list / dict when called without a signature)."""
    if hasattr(model_input, "columns"):
        key = column if column in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[key].tolist()]
    if isinstance(model_input, dict):
        return [str(v) for v in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


class PalmModel(mlflow.pyfunc.PythonModel):
    """A palm export as a pyfunc model (see the module docstring)."""

    max_rows = 128  # rows (prompts, or prompt/response pairs) per request
    max_chars = 32_768  # characters per prompt or response
    max_messages = 64  # messages per chat request
    chunk_rows = 16  # rows generated together (a reward model scores its own batches of 32)

    def _check(self, *columns: list[str]) -> None:
        """Refuse a request past the caps, in one line that names the cap."""
        from palm.core.errors import UserError

        rows = len(columns[0])
        if rows > self.max_rows:
            raise UserError(f"the request has {rows} rows; at most {self.max_rows} per request "
                            "(PalmModel.max_rows): send them in several requests")
        for column in columns:
            for i, text in enumerate(column):
                if len(text) > self.max_chars:
                    raise UserError(f"row {i} has {len(text)} characters; at most {self.max_chars} per prompt "
                                    "or response (PalmModel.max_chars)")

    def load_context(self, context: Any) -> None:
        from palm.model.export import load_model, load_tokenizer, read_export
        from palm.model.parallel import GroupHold

        self.export = read_export(context.artifacts["model"])
        self.tokenizer = load_tokenizer(self.export)
        # the one-process groups, shared with the other models loaded in this process and up
        # while any of them lives (a caller's own groups are used and left to it)
        self._groups = GroupHold()
        try:
            self.model = load_model(self.export)
        except BaseException:
            self._groups.release()
            raise

    # a DataFrame is a type hint MLflow infers nothing from (the signature decides what comes in)
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        if self.export.is_reward:
            prompts, responses = _texts(model_input, "prompt"), _texts(model_input, "response")
            self._check(prompts, responses)
            return self._score(prompts, responses)
        p = {**PARAMS, **(params or {})}
        if isinstance(model_input, dict) and "messages" in model_input and self.export.kind != "pretrain":
            return self._chat(model_input, p)
        prompts = _texts(model_input)
        self._check(prompts)
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r, _ in self._complete(
            [self._prompt_ids(t) for t in prompts], p)]

    # the fields of an OpenAI chat request besides messages, by the param each one sets
    CHAT_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}

    def _chat(self, request: dict, p: dict[str, Any]) -> dict:
        """One OpenAI chat request (MLflow's chat format) answered with a chat completion."""
        from palm.apps.messages import BadMessages, chat_turns
        from palm.core.errors import UserError
        from palm.data.chat import ChatTemplate
        from palm.data.chat_readers import Turn

        unknown = sorted(set(request) - {"messages", "n", "stream", "model", *self.CHAT_FIELDS})
        if unknown:
            raise UserError(f"chat request: unsupported field(s) {', '.join(map(str, unknown))}; this model takes "
                            f"messages, {', '.join(self.CHAT_FIELDS)}, n (1) and stream (false)")
        if request.get("n", 1) != 1 or request.get("stream", False):
            raise UserError("chat request: n must be 1 and stream false (one reply per request, whole)")
        try:
            turns = chat_turns(request["messages"], self.max_messages, "PalmModel.max_messages")
        except BadMessages as err:
            raise UserError(f"chat request: {err}") from None
        self._check([text for _, text in turns])
        for field, param in self.CHAT_FIELDS.items():
            if request.get(field) is not None:
                p[param] = request[field]
        prompt = self._fit(ChatTemplate(self.tokenizer).render_prompt(tuple(Turn(r, t) for r, t in turns)), p)
        ((reply, stopped),) = self._complete([prompt], p)
        made = len(reply) - stopped  # the end-of-turn token is no text
        n_prompt = len(prompt)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": f"palm-{self.export.kind}",
                "choices": [{"index": 0, "finish_reason": "stop" if stopped else "length",
                             "message": {"role": "assistant",
                                         "content": self.tokenizer.decode(reply, skip_special_tokens=True)}}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": made, "total_tokens": n_prompt + made}}

    def _prompt_ids(self, text: str) -> list[int]:
        from palm.data.chat import ChatTemplate
        from palm.data.chat_readers import Turn

        if self.export.kind == "pretrain":
            return self.tokenizer.encode(text, add_special_tokens=False).ids or [self._ids["eod_id"]]
        return ChatTemplate(self.tokenizer).render_prompt((Turn("user", text),))

    @property
    def _ids(self) -> dict[str, int]:
        from palm.core.tokenizer import special_ids

        return special_ids(self.tokenizer)

    def _fit(self, prompt: list[int], p: dict[str, Any]) -> list[int]:
        """The prompt's last tokens that leave room for ``max_new_tokens`` in the model's context
        (:meth:`_complete` refuses a ``max_new_tokens`` that leaves none)."""
        return prompt[-(self.model.cfg.seq_len - int(p["max_new_tokens"])):]

    def _complete(self, prompts: list[list[int]], p: dict[str, Any]) -> list[tuple[list[int], bool]]:
        """Each prompt's reply tokens (its stop token included) and whether it stopped (else it
        ran out of ``max_new_tokens``)."""
        import torch

        from palm.core.errors import UserError
        from palm.decode.generate import SamplingConfig, generate
        from palm.eval.evaluate import replies

        seq_len = self.model.cfg.seq_len
        new = int(p["max_new_tokens"])
        if not 1 <= new < seq_len:
            raise UserError(f"max_new_tokens: must be between 1 and {seq_len - 1} (the model's context), got {new}")
        top_p = float(p["top_p"])
        s = SamplingConfig(float(p["temperature"]), int(p["top_k"]) or None, top_p if top_p < 1 else None)
        ids = self._ids
        stop = (ids["end_turn_id"], ids["eod_id"]) if self.export.kind != "pretrain" else (ids["eod_id"],)
        generator = torch.Generator(self.model.embedding.weight.device).manual_seed(int(p["seed"]))
        out: list[tuple[list[int], bool]] = []
        for start in range(0, len(prompts), self.chunk_rows):  # one chunk's memory at a time
            rows = [self._fit(ids_, p) for ids_ in prompts[start:start + self.chunk_rows]]
            with torch.no_grad():
                gen = generate(self.model, rows, new, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                               stop_ids=stop, pad_id=ids["pad_id"], generator=generator)
            out += zip(replies([gen]), gen.stopped.tolist())
        return out

    def _score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from palm.data.chat import ChatTemplate
        from palm.data.chat_readers import Turn
        from palm.eval.evaluate import scores

        template = ChatTemplate(self.tokenizer)
        seq_len = self.model.cfg.seq_len
        seqs = []
        for prompt, response in zip(prompts, responses):
            reply = template.render_reply(response)[:seq_len - 1]
            seqs.append(template.render_prompt((Turn("user", prompt),))[-(seq_len - len(reply)):] + reply)
        if not seqs:
            return []
        stats = self.export.config["reward"]
        raw = scores(self.model, seqs, batch_size=32)
        return ((raw - float(stats["mean"])) / float(stats["std"])).tolist()


mlflow.models.set_model(PalmModel())
