"""The official `openai` Python client against `ferry serve` on the default model: list the
models, stream a chat completion (with usage), get the same answer whole, and see API errors
raised as the client's own exception types. Usage: python openai_stream.py PATH/TO/ferry
"""

import json
import re
import subprocess
import sys
import threading

import openai
from openai import OpenAI


def start(ferry):
    server = subprocess.Popen(
        [ferry, "serve", "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    found = {}

    def read():
        for line in server.stderr:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                found["base"] = match.group(1)
                ready.set()
            elif line.startswith("error:"):
                found["error"] = line.strip()
                ready.set()

    ready = threading.Event()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(300) or "base" not in found:
        server.kill()
        sys.exit(f"ferry serve did not start: {found.get('error', 'timed out')}")
    return server, found["base"]


def main():
    ferry = sys.argv[1]
    server, base = start(ferry)
    try:
        client = OpenAI(base_url=base + "/v1", api_key="not-needed", timeout=300, max_retries=0)
        models = [m.id for m in client.models.list()]
        assert models == ["ferry-default"], models
        settings = dict(model="ferry-default", temperature=0.75, seed=5, max_tokens=16)
        messages = [{"role": "user", "content": "Tell me of the king"}]

        stream = client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **settings
        )
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        streamed = "".join(pieces)
        assert len(pieces) > 1, pieces
        assert finish in ("stop", "length"), finish
        assert usage is not None and usage.completion_tokens > 0, usage

        whole = client.chat.completions.create(messages=messages, **settings)
        assert whole.choices[0].message.content == streamed, (whole.choices[0].message.content, streamed)
        assert whole.usage.total_tokens == usage.total_tokens

        # The same request through `ferry generate`.
        out = subprocess.run(
            [ferry, "generate", "--chat", "--prompt", messages[0]["content"], "--temperature", "0.75",
             "--seed", "5", "--max-new-tokens", "16", "--json"],
            capture_output=True, text=True, check=True,
        )
        assert json.loads(out.stdout)["text"] == streamed

        text = client.completions.create(prompt="And the Lord said", **settings)
        assert text.choices[0].text, text

        try:
            client.chat.completions.create(messages=messages, model="no-such-model")
            raise AssertionError("an unknown model was accepted")
        except openai.NotFoundError as e:
            assert e.status_code == 404
        try:
            client.chat.completions.create(messages=messages, model="ferry-default", temperature=9)
            raise AssertionError("temperature 9 was accepted")
        except openai.BadRequestError as e:
            assert "temperature" in str(e), e
        print(f"openai {openai.__version__}: streamed {len(pieces)} chunks: {streamed!r}")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
