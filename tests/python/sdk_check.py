#!/usr/bin/env python3
"""Drives the official `openai` and `anthropic` Python SDKs against a running Tollgate ingress.

Run by `tests/tests/sdk.rs`, which starts the ingress, the mock provider and the meter, and
passes everything this script needs as one JSON document in the `TOLLGATE_SDK_SPEC`
environment variable (or as the first argument):

    {
      "base_url": "http://127.0.0.1:PORT",        # the ingress, without /v1
      "key": "...", "bad_key": "...",              # a valid gateway key and one that is not
      "headers": {"X-TFY-Project": "..."},         # identity headers sent on every call
      "session_header": "X-TFY-Session-ID",        # set per call to the case's session
      "cases": [{
          "session": "sdk-...",                    # unique per case: the ClickHouse row's key
          "sdk": "openai" | "anthropic",
          "call": "chat" | "chat_stream" | "chat_stream_usage" | "embeddings"
                | "messages" | "messages_stream_raw" | "messages_stream_helper",
          "model": "vm-openai",
          "text": "hello\\n#mock prompt_tokens=..",  # the user message (or embeddings input)
          "max_tokens": 64,                        # Anthropic calls only
          "expect_text": "w1 w2 w3",               # absent for embeddings
          "expect_usage": {...} | null             # exact usage fields the SDK must report;
                                                   # null: the SDK must see no usage at all
      }],
      "errors": [{"sdk": "openai", "call": "chat", "model": "...", "key": "good" | "bad",
                  "error": "AuthenticationError", "status": 401, "message_contains": "..."}],
      "stream_failures": [{"session": "...", "sdk": "openai", "call": "chat_stream" | "messages_stream_helper",
                           "model": "...", "text": "...#mock close_after=2", "max_tokens": 64,
                           "expect_text_before": "w1 w2 ", "error": "APIError", "message_contains": "..."}],
      "models": ["vm-anthropic", "vm-openai"]      # what models.list must return (any order)
    }

Prints one line per check and a summary line; exits non-zero at the first mismatch.
"""

import json
import os
import sys

import anthropic
import openai

TIMEOUT_S = 30.0


class Mismatch(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def equal(got, want, what):
    check(got == want, f"{what}: got {got!r}, want {want!r}")


def openai_client(spec, key):
    return openai.OpenAI(
        base_url=spec["base_url"] + "/v1",
        api_key=key,
        default_headers=spec["headers"],
        max_retries=0,
        timeout=TIMEOUT_S,
    )


def anthropic_client(spec, key):
    return anthropic.Anthropic(
        base_url=spec["base_url"],
        api_key=key,
        default_headers=spec["headers"],
        max_retries=0,
        timeout=TIMEOUT_S,
    )


def session_headers(spec, case):
    return {spec["session_header"]: case["session"]}


def openai_usage_fields(usage):
    details = usage.prompt_tokens_details
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": details.cached_tokens if details is not None else None,
    }


def anthropic_usage_fields(usage):
    return {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
    }


def run_openai_case(client, spec, case):
    name = f"{case['session']} ({case['sdk']} {case['call']} {case['model']})"
    extra = session_headers(spec, case)
    call = case["call"]
    if call == "embeddings":
        resp = client.embeddings.create(model=case["model"], input=case["text"], extra_headers=extra)
        equal(len(resp.data), 1, f"{name}: embeddings returned")
        check(len(resp.data[0].embedding) > 0, f"{name}: the embedding is empty")
        got = {"prompt_tokens": resp.usage.prompt_tokens, "total_tokens": resp.usage.total_tokens}
        equal(got, case["expect_usage"], f"{name}: usage")
        return
    messages = [{"role": "user", "content": case["text"]}]
    if call == "chat":
        resp = client.chat.completions.create(model=case["model"], messages=messages, extra_headers=extra)
        equal(resp.object, "chat.completion", f"{name}: object")
        equal(len(resp.choices), 1, f"{name}: choices")
        equal(resp.choices[0].message.role, "assistant", f"{name}: role")
        equal(resp.choices[0].message.content, case["expect_text"], f"{name}: text")
        equal(resp.choices[0].finish_reason, "stop", f"{name}: finish_reason")
        check(resp.usage is not None, f"{name}: no usage in a non-streaming answer")
        equal(openai_usage_fields(resp.usage), case["expect_usage"], f"{name}: usage")
        return
    kwargs = {}
    if call == "chat_stream_usage":
        kwargs["stream_options"] = {"include_usage": True}
    else:
        check(call == "chat_stream", f"{name}: unknown call")
    stream = client.chat.completions.create(
        model=case["model"], messages=messages, stream=True, extra_headers=extra, **kwargs
    )
    text = []
    usages = []
    finish = []
    chunks = 0
    for chunk in stream:
        chunks += 1
        equal(chunk.object, "chat.completion.chunk", f"{name}: chunk object")
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish.append(choice.finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    equal("".join(text), case["expect_text"], f"{name}: streamed text")
    equal(finish, ["stop"], f"{name}: finish reasons")
    if case["expect_usage"] is None:
        equal(len(usages), 0, f"{name}: usage chunks shown to a client that did not ask for them")
    else:
        equal(len(usages), 1, f"{name}: usage chunks")
        equal(openai_usage_fields(usages[-1]), case["expect_usage"], f"{name}: final usage")
    check(chunks >= 3, f"{name}: only {chunks} chunks")


def run_anthropic_case(client, spec, case):
    name = f"{case['session']} ({case['sdk']} {case['call']} {case['model']})"
    extra = session_headers(spec, case)
    call = case["call"]
    args = dict(
        model=case["model"],
        max_tokens=case["max_tokens"],
        messages=[{"role": "user", "content": case["text"]}],
        extra_headers=extra,
    )
    if call == "messages":
        msg = client.messages.create(**args)
        equal(msg.type, "message", f"{name}: type")
        equal(msg.role, "assistant", f"{name}: role")
        equal(len(msg.content), 1, f"{name}: content blocks")
        equal(msg.content[0].type, "text", f"{name}: block type")
        equal(msg.content[0].text, case["expect_text"], f"{name}: text")
        equal(msg.stop_reason, "end_turn", f"{name}: stop_reason")
        equal(anthropic_usage_fields(msg.usage), case["expect_usage"], f"{name}: usage")
        return
    if call == "messages_stream_raw":
        stream = client.messages.create(stream=True, **args)
        kinds = []
        text = []
        start_usage = None
        delta_usage = None
        stop_reason = None
        for event in stream:
            kinds.append(event.type)
            if event.type == "message_start":
                start_usage = event.message.usage
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text.append(event.delta.text)
            elif event.type == "message_delta":
                delta_usage = event.usage
                stop_reason = event.delta.stop_reason
        equal(kinds[0], "message_start", f"{name}: first event")
        equal(kinds[-1], "message_stop", f"{name}: last event")
        check("message_delta" in kinds, f"{name}: no message_delta in {kinds}")
        equal("".join(text), case["expect_text"], f"{name}: streamed text")
        equal(stop_reason, "end_turn", f"{name}: stop_reason")
        check(start_usage is not None and delta_usage is not None, f"{name}: usage missing")
        # Usage on message_delta is cumulative; fields it leaves out keep message_start's value.
        final = anthropic_usage_fields(start_usage)
        for field, value in anthropic_usage_fields(delta_usage).items():
            if value is not None:
                final[field] = value
        equal(final, case["expect_usage"], f"{name}: final usage")
        return
    check(call == "messages_stream_helper", f"{name}: unknown call")
    with client.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        msg = stream.get_final_message()
    equal(text, case["expect_text"], f"{name}: text_stream")
    equal(msg.content[0].text, case["expect_text"], f"{name}: final message text")
    equal(msg.stop_reason, "end_turn", f"{name}: stop_reason")
    equal(anthropic_usage_fields(msg.usage), case["expect_usage"], f"{name}: final usage")


def run_error(spec, err):
    name = f"{err['sdk']} {err['call']} {err['model']} with the {err['key']} key"
    key = spec["key"] if err["key"] == "good" else spec["bad_key"]
    headers = {spec["session_header"]: "sdk-refused"}
    if err["sdk"] == "openai":
        client = openai_client(spec, key)
        wanted = getattr(openai, err["error"])
        messages = [{"role": "user", "content": "hello"}]

        def call():
            if err["call"] == "chat_stream":
                for _ in client.chat.completions.create(
                    model=err["model"], messages=messages, stream=True, extra_headers=headers
                ):
                    pass
            else:
                client.chat.completions.create(model=err["model"], messages=messages, extra_headers=headers)
    else:
        client = anthropic_client(spec, key)
        wanted = getattr(anthropic, err["error"])
        args = dict(
            model=err["model"], max_tokens=16, messages=[{"role": "user", "content": "hello"}], extra_headers=headers
        )

        def call():
            if err["call"] == "messages_stream_helper":
                with client.messages.stream(**args) as stream:
                    stream.get_final_message()
            else:
                client.messages.create(**args)

    try:
        call()
    except wanted as e:
        equal(e.status_code, err["status"], f"{name}: status")
        check(
            err["message_contains"] in str(e),
            f"{name}: error message {str(e)!r} does not mention {err['message_contains']!r}",
        )
        return
    except Exception as e:  # noqa: BLE001 - any other error is the mismatch to report
        raise Mismatch(f"{name}: raised {type(e).__name__}: {e}, want {err['error']}") from e
    raise Mismatch(f"{name}: succeeded, want {err['error']}")


def run_stream_failure(clients, spec, case):
    """A stream the provider cuts: the SDK yields the text sent so far, then raises."""
    name = f"{case['session']} ({case['sdk']} {case['call']} {case['model']}, cut)"
    extra = session_headers(spec, case)
    messages = [{"role": "user", "content": case["text"]}]
    seen = []
    if case["sdk"] == "openai":
        wanted = getattr(openai, case["error"])

        def call():
            stream = clients["openai"].chat.completions.create(
                model=case["model"], messages=messages, stream=True, extra_headers=extra
            )
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        seen.append(choice.delta.content)
    else:
        wanted = getattr(anthropic, case["error"])

        def call():
            with clients["anthropic"].messages.stream(
                model=case["model"], max_tokens=case["max_tokens"], messages=messages, extra_headers=extra
            ) as stream:
                for text in stream.text_stream:
                    seen.append(text)

    try:
        call()
    except wanted as e:
        check(
            case["message_contains"] in str(e),
            f"{name}: error message {str(e)!r} does not mention {case['message_contains']!r}",
        )
        equal("".join(seen), case["expect_text_before"], f"{name}: text before the cut")
        return
    except Exception as e:  # noqa: BLE001 - any other error is the mismatch to report
        raise Mismatch(f"{name}: raised {type(e).__name__}: {e}, want {case['error']}") from e
    raise Mismatch(f"{name}: the stream ended without an error after {''.join(seen)!r}")


def main():
    raw = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TOLLGATE_SDK_SPEC")
    if not raw:
        print("sdk_check: pass the spec as TOLLGATE_SDK_SPEC or the first argument", file=sys.stderr)
        return 2
    spec = json.loads(raw)
    print(f"sdk_check: openai {openai.__version__}, anthropic {anthropic.__version__}, ingress {spec['base_url']}")
    clients = {"openai": openai_client(spec, spec["key"]), "anthropic": anthropic_client(spec, spec["key"])}
    done = 0
    try:
        for case in spec["cases"]:
            runner = run_openai_case if case["sdk"] == "openai" else run_anthropic_case
            runner(clients[case["sdk"]], spec, case)
            print(f"ok  {case['session']}: {case['sdk']} {case['call']} {case['model']}")
            done += 1
        for case in spec["stream_failures"]:
            run_stream_failure(clients, spec, case)
            print(f"ok  {case['session']}: {case['sdk']} {case['call']} {case['model']} raised {case['error']} mid-stream")
            done += 1
        for err in spec["errors"]:
            run_error(spec, err)
            print(f"ok  {err['sdk']} {err['call']} {err['model']} ({err['key']} key) raised {err['error']}")
            done += 1
        ids = sorted(m.id for m in clients["openai"].models.list())
        equal(ids, sorted(spec["models"]), "models.list")
        print(f"ok  models.list: {ids}")
        done += 1
    except Mismatch as e:
        print(f"sdk_check: MISMATCH: {e}", file=sys.stderr)
        print(f"sdk_check: FAILED after {done} passing checks", file=sys.stderr)
        return 1
    except (openai.APIError, anthropic.APIError) as e:
        body = getattr(e, "body", None)
        print(f"sdk_check: UNEXPECTED {type(e).__name__}: {e} (body {body!r})", file=sys.stderr)
        print(f"sdk_check: FAILED after {done} passing checks", file=sys.stderr)
        return 1
    print(
        f"sdk_check: all {done} checks passed ({len(spec['cases'])} calls, "
        f"{len(spec['stream_failures'])} cut streams, {len(spec['errors'])} refusals, models.list)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
