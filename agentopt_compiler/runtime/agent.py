"""The agent loop on a compiled engine: render the conversation with the engine's chat template, generate, parse
tool calls, run the tools, feed the observations back, until a final answer or the step limit.

    agent = Agent(engine, tools=[calculator, convert_units], system="You are a careful assistant.")
    result = agent.run("What is 17 * 23 in miles if it were km?", on_event=print)
    result.answer, result.steps, result.usage

Each turn reuses the conversation's KV cache: only tokens not already cached are prefilled (the observation and the
template's turn markers). With a shared ``PrefixCache``, a new agent over the same system prompt and tools starts
from the cached KV of that prefix. Tool failures of any kind (malformed call, unknown tool, bad arguments, exception,
timeout) become observations the model sees; the loop itself does not raise on them.

With ``constrained=True`` (the default when tools are given) the model's tool calls are decoded under a grammar
built from the tools' JSON schemas in its family's call syntax (constraints.py): text stays free until the call's
opening tag; from there every call names a tool and has arguments its schema accepts, and the tokens the grammar
forces (tags, keys, separators, a tool name once a prefix fixes it) are fed in one engine call each.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import AgentOptError, ContextOverflowError
from .chat import render_chat
from .constraints import Matcher, call_syntax, check_grammar, tool_call_grammar
from .generation import SHORTEST_OUTPUT_SEARCH, GenerationConfig, TextStream
from .tools import Tool, ToolCall, parse_tool_calls, run_tool_call

TOOL_CALL_ENDS = ("</tool_call>", "<|/tool_call|>")  # Qwen/Hermes, Phi-4-mini: a call ends the step
# appended to the observation of a call that failed before with the same arguments; a third identical failure stops
# the loop (finish_reason "repeated_failure") instead of repeating it to the step limit
REPEATED_FAILURE_NOTE = " (this exact call already failed; change the arguments or answer without it)"
MAX_TOOL_TIMEOUT_S = 86400.0  # a day; far longer waits overflow the platform's timestamps
# an observation may take at most this share of the engine's context: a tool that returns megabytes (or a memory
# lookup listing thousands of keys) is cut, marked, instead of ending the task with a context overflow
OBSERVATION_CONTEXT_SHARE = 0.25


def _failed(outcome) -> bool:
    """A call that failed: an error result, or a tool that reports failure as ``{"error": ...}`` text (an
    ``"error": null`` or empty, as many APIs send on success, is no failure)."""
    if outcome.error:
        return True
    try:
        value = json.loads(outcome.output)
    except (TypeError, ValueError):
        return False
    return isinstance(value, dict) and value.get("error") not in (None, "", False, [], {})


def _seen_again(failures: dict[tuple[str, str], int], key: tuple[str, str], observation: str) -> tuple[str, bool]:
    """A failed call's observation, counted in ``failures``: the second time the same failure is said so (a
    different observation); True the third time (the loop stops)."""
    failures[key] = failures.get(key, 0) + 1
    return observation + (REPEATED_FAILURE_NOTE if failures[key] == 2 else ""), failures[key] > 2


@dataclass
class AgentStep:
    text: str  # the model's raw output for this step
    calls: list[ToolCall]
    observations: list[str]
    engine_calls: int = 0  # decode calls the step took (its first token comes from the prompt's prefill)


@dataclass
class AgentResult:
    answer: str | None  # the final answer (cut if finish_reason is "length" or "context"), or None without one
    finish_reason: str  # "answer", "length" (the answer reached the step's token limit), "step_limit", "context"
    # or "repeated_failure"
    steps: list[AgentStep] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)


def _check_agent_options(engine, tools, system, max_steps, tool_timeout_s, generation) -> None:
    from .engine import Engine

    problems = [
        (not isinstance(engine, Engine), f"engine must be an Engine (agentopt_compiler.load_engine), got "
                                         f"{type(engine).__name__}"),
        (isinstance(tools, (str, bytes)) or not isinstance(tools, (list, tuple)),
         f"tools must be a list of functions or Tools, got {type(tools).__name__}"),
        (system is not None and not isinstance(system, str), f"system must be text, got {type(system).__name__}"),
        (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1,
         f"max_steps must be an integer of at least 1, got {max_steps!r}"),
        (isinstance(tool_timeout_s, bool) or not isinstance(tool_timeout_s, (int, float))
         or not 0 < tool_timeout_s <= MAX_TOOL_TIMEOUT_S,
         f"tool_timeout_s must be a number of seconds above 0, at most {MAX_TOOL_TIMEOUT_S:g}, got "
         f"{tool_timeout_s!r}"),
        (generation is not None and not isinstance(generation, GenerationConfig),
         f"generation must be a GenerationConfig, got {type(generation).__name__}"),
    ]
    wrong = next((message for bad, message in problems if bad), None)
    if wrong:
        raise AgentOptError(wrong)


class Agent:
    def __init__(self, engine, tools: list[Callable[..., Any] | Tool] = (), system: str | None = None,
                 max_steps: int = 6, tool_timeout_s: float = 30.0, generation: GenerationConfig | None = None,
                 prefix_cache=None, constrained: bool | None = None):
        _check_agent_options(engine, tools, system, max_steps, tool_timeout_s, generation)
        self.engine = engine
        made = [t if isinstance(t, Tool) else Tool.from_function(t) for t in tools]
        self.tools = {t.name: t for t in made}
        if len(self.tools) < len(made):
            names = [t.name for t in made]
            raise AgentOptError(f"each tool needs its own name; {sorted({n for n in names if names.count(n) > 1})} "
                                "is given more than once")
        self.max_steps, self.tool_timeout_s = max_steps, tool_timeout_s
        self.generation = generation or GenerationConfig(max_new_tokens=256)
        constrained = bool(self.tools) if constrained is None else constrained
        if constrained and not self.tools:
            raise AgentOptError("constrained=True constrains tool calls, and this agent has no tools")
        if constrained and engine.tokenizer is None:
            raise AgentOptError("constrained tool calls need the engine's tokenizer, and this engine has none")
        # the tools' grammar (free text, then calls valid for their schemas); None: unconstrained
        self.grammar = tool_call_grammar([t.schema() for t in self.tools.values()],
                                         call_syntax(engine.tokenizer.chat_template), engine.tokenizer) \
            if constrained else None
        if self.grammar is not None:  # a schema llguidance cannot use fails here, not at the first step
            try:
                check_grammar(self.grammar, engine.tokenizer, engine.manifest["model"]["config"]["vocab_size"],
                              engine.eos_token_ids)
            except AgentOptError as exc:
                raise AgentOptError(f"{exc} (constrained=False, or --no-constrain, decodes calls freely)") from None
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        self.conversation = engine.conversation(prefix_cache)
        self._prefix_remembered = False
        self._shortest_call: int | None = None  # tokens of the shortest call the grammar allows (found once)

    def _fit(self, observation: str) -> str:
        """The observation, cut to OBSERVATION_CONTEXT_SHARE of the context where it is longer (marked, with its
        length), so that one tool result cannot end the task by overflowing the context."""
        if self.engine.tokenizer is None:
            return observation
        limit = int(self.engine.context_length * OBSERVATION_CONTEXT_SHARE)
        if len(observation) <= limit:  # a token holds at least one character
            return observation
        ids = self.engine.encode(observation, add_special_tokens=False)
        if len(ids) <= limit:
            return observation
        note = f" ...[cut: the result has {len(ids)} tokens, the context holds {self.engine.context_length}]"
        keep = max(limit - len(self.engine.encode(note, add_special_tokens=False)), 0)
        return self.engine.tokenizer.decode(ids[:keep]).rstrip("\ufffd") + note  # not half a character

    def _check_room_for_a_call(self, config: GenerationConfig) -> None:
        """Under the tools' grammar a call that cannot fit the step's token limit is never opened: the model would
        answer without its tools, silently. A limit below the shortest call is refused instead."""
        if self.grammar is None or not config.max_new_tokens or self._shortest_call == 0:
            return
        if self._shortest_call is None:
            matcher = Matcher(self.grammar, self.engine.tokenizer,
                              self.engine.manifest["model"]["config"]["vocab_size"], self.engine.eos_token_ids)
            opening = self.engine.encode(self.grammar.call_open, add_special_tokens=False)
            closing = matcher.closing(SHORTEST_OUTPUT_SEARCH, after=opening)
            self._shortest_call = 0 if closing is None else len(opening) + len(closing)  # 0: none found, unchecked
        if 0 < config.max_new_tokens < self._shortest_call:
            raise AgentOptError(f"a limit of {config.max_new_tokens} new tokens per step is too small for a call of "
                                f"the tools: the shortest call takes {self._shortest_call} tokens; raise the limit "
                                "(max_new_tokens; --max-new-tokens in the CLI)")

    def _prompt_ids(self) -> list[int]:
        text = render_chat(self.engine.tokenizer, self.messages, [t.schema() for t in self.tools.values()],
                           add_generation_prompt=True)
        return self.engine.encode(text, add_special_tokens=False)

    def _remember_system_prefix(self) -> None:
        """Share the KV of the system prompt + tool schemas with later agents (once per agent)."""
        if self._prefix_remembered or self.conversation.prefix_cache is None:
            return
        self._prefix_remembered = True
        head_messages = [m for m in self.messages[:1] if m["role"] == "system"]
        if not head_messages and not self.tools:
            return
        head = render_chat(self.engine.tokenizer, head_messages or [{"role": "system", "content": ""}],
                           [t.schema() for t in self.tools.values()], add_generation_prompt=False)
        head_ids = self.engine.encode(head, add_special_tokens=False)
        if self.conversation.tokens[:len(head_ids)] == head_ids:  # the template renders the head as a prefix
            self.conversation.remember_prefix(len(head_ids))

    def run(self, task: str, on_event: Callable[[dict], None] | None = None, **generation) -> AgentResult:
        """Run ``task`` to a final answer or another finish (``AgentResult.finish_reason``: a conversation that
        outgrows the context during the task ends it with "context"). If it raises (e.g. the task's own prompt
        does not fit), the history is left as it was before the task."""
        if on_event is not None and not callable(on_event):
            raise AgentOptError(f"on_event must be a function taking an event dict, got {on_event!r}")
        if not isinstance(task, str) or not task.strip():
            got = repr(task) if not isinstance(task, str) else f"{len(task)} whitespace characters" if task else "''"
            raise AgentOptError(f"a task is non-empty text, got {got}")
        of_agent = sorted(set(generation) & set(inspect.signature(Agent.__init__).parameters))
        if of_agent:  # (run takes generation options only)
            raise AgentOptError(f"{', '.join(of_agent)} is an option of Agent(...), not of run(); give it when "
                                "making the agent")
        kept = len(self.messages)
        try:
            return self._run(task, on_event, **generation)
        except BaseException:
            del self.messages[kept:]
            raise

    def _run(self, task: str, on_event, **generation) -> AgentResult:
        emit = on_event or (lambda _event: None)
        config = self.generation.with_options(**generation)
        config = config.with_options(stop_strings=tuple(config.stop_strings) + TOOL_CALL_ENDS,
                                     grammar=config.grammar or self.grammar)
        if config.grammar is self.grammar:
            self._check_room_for_a_call(config)
        self.messages.append({"role": "user", "content": task})
        result = AgentResult(None, "step_limit")
        conversation = self.conversation
        start = (conversation.prefilled_tokens, conversation.reused_tokens, conversation.drafted_tokens,
                 conversation.accepted_draft_tokens, conversation.forced_tokens, conversation.decode_calls,
                 conversation.closed_at_limit)
        generated = 0
        failures: dict[tuple[str, str], int] = {}  # (tool, arguments) -> how often that exact call failed
        for step in range(self.max_steps):
            prompt_ids = self._prompt_ids()
            try:
                logits = self.conversation.prefill_to(prompt_ids)
            except ContextOverflowError:
                if not step:
                    raise  # the request itself does not fit: that error says so
                result.finish_reason = "context"  # the task ran out of room: it ends, unanswered, saying why
                emit({"type": "stopped", "reason": (
                    f"the conversation outgrew the engine's context at step {step + 1} of the task: it has "
                    f"{len(prompt_ids)} tokens and the context holds {self.engine.context_length} (with at least one "
                    "new token); the earlier steps' calls and results filled it. Allow fewer steps (--max-steps), "
                    "give tools that return less, or recompile with a larger --context-length")})
                break
            self._remember_system_prefix()
            calls_before = conversation.decode_calls
            text, reason, count = self._generate(logits, config, emit)
            engine_calls = conversation.decode_calls - calls_before
            generated += count
            if reason in TOOL_CALL_ENDS:
                text += reason  # the stop string is the end of a call: keep it for parsing
            parsed = parse_tool_calls(text)
            if reason == "length" and parsed.errors and not parsed.calls:  # a call the token limit cut (decoded
                # freely: the grammar closes calls before a limit): not a malformed call to tell the model about
                self.messages.append({"role": "assistant", "content": text})
                result.finish_reason = "length"
                result.steps.append(AgentStep(text, [], [], engine_calls))
                emit({"type": "stopped", "reason": f"a tool call was cut at the step's limit of "
                                                   f"{config.max_new_tokens} new tokens; raise the limit "
                                                   "(max_new_tokens; --max-new-tokens in the CLI)"})
                break
            if not parsed.calls and not parsed.errors:
                self.messages.append({"role": "assistant", "content": text})
                result.answer = text.strip()
                result.finish_reason = reason if reason in ("length", "context") else "answer"
                result.steps.append(AgentStep(text, [], [], engine_calls))
                emit({"type": "final", "text": text.strip()})
                break
            self.messages.append({"role": "assistant", "content": parsed.content, "tool_calls": [
                {"id": f"call_{len(self.messages)}_{i}", "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(parsed.calls)]})
            observations = []
            repeated = None  # what failed a third time the same way: the loop stops
            for error in parsed.errors:
                observation, again = _seen_again(failures, ("", error), self._fit(f"error: {error}"))
                repeated = repeated or ("a malformed call" if again else None)
                emit({"type": "tool_error", "error": error, "observation": observation})
                observations.append(observation)
            for call in parsed.calls:
                emit({"type": "tool_call", "name": call.name, "arguments": call.arguments})
                outcome = run_tool_call(call, self.tools, self.tool_timeout_s)
                observation = self._fit(outcome.text)
                if _failed(outcome):
                    arguments = json.dumps(call.arguments, sort_keys=True, default=str)
                    observation, again = _seen_again(failures, (call.name, arguments), observation)
                    repeated = repeated or (f"the call {call.name}({arguments})" if again else None)
                emit({"type": "tool_result", "name": call.name, "output": outcome.output, "error": outcome.error,
                      "observation": observation})
                observations.append(observation)
            for observation in observations:
                self.messages.append({"role": "tool", "content": observation})
            result.steps.append(AgentStep(text, parsed.calls, observations, engine_calls))
            if repeated is not None:
                result.finish_reason = "repeated_failure"
                emit({"type": "stopped", "reason": f"{repeated} failed three times the same way"})
                break
            if reason == "context":
                result.finish_reason = "context"
                break
        result.usage = {"prefilled_tokens": conversation.prefilled_tokens - start[0],
                        "reused_tokens": conversation.reused_tokens - start[1],
                        "generated_tokens": generated,
                        "drafted_tokens": conversation.drafted_tokens - start[2],  # prompt lookup (0 when off)
                        "accepted_draft_tokens": conversation.accepted_draft_tokens - start[3],
                        "forced_tokens": conversation.forced_tokens - start[4],  # by the grammar (0 when off)
                        "decode_calls": conversation.decode_calls - start[5],  # engine calls while generating
                        # steps whose call the grammar closed early, the step's token limit or the context being near
                        "closed_at_limit": conversation.closed_at_limit - start[6]}
        return result

    def _generate(self, logits, config: GenerationConfig, emit) -> tuple[str, str, int]:
        """Generate one assistant message; returns (text, reason, tokens): reason is stop, length, context, or the
        stop string that ended the text (a tool call's closing tag, or one of the caller's)."""
        text = TextStream(self.engine.tokenizer, config.stop_strings)
        tokens = self.conversation.generate(logits, config)
        count = 0
        while True:
            try:
                token = next(tokens)
            except StopIteration as stop:
                tail = text.flush()
                if tail:
                    emit({"type": "token", "text": tail})
                return text.visible, stop.value or "length", count
            count += 1
            delta = text.push(token)
            if delta:
                emit({"type": "token", "text": delta})
            if text.stop is not None:
                tokens.close()
                return text.visible, text.stop, count


def describe_event(event: dict) -> str:
    """A one-line, human-readable form of an agent event (for the CLI)."""
    kind = event["type"]
    if kind == "tool_call":
        return f"\n→ {event['name']}({json.dumps(event['arguments'], ensure_ascii=False)})"
    if kind == "tool_result":  # what the model sees (the result, cut or with a note), else the tool's own words
        return f"← {event.get('observation') or ('error: ' + event['error'] if event['error'] else event['output'])}"
    if kind == "tool_error":  # a malformed call: the model's streamed text ends without a newline
        return f"\n← {event.get('observation') or 'error: ' + event['error']}"
    if kind == "stopped":
        return f"[stopped: {event['reason']}]"
    return event.get("text", "")
