"""Talks to a Strata agent's local API with the official `openai` client.

Usage: python openai_client.py BASE_URL   (e.g. http://127.0.0.1:7070/v1)

Exits non-zero with a message on the first thing that does not behave as an
OpenAI-compatible server should. Prints one line per check.
"""

import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused-on-the-device", max_retries=0)

    models = [m.id for m in client.models.list()]
    assert "smollm2" in models and "minilm" in models, models
    print("models:", models)

    chat = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
    )
    answer = chat.choices[0].message.content
    assert answer == "The capital of France is Paris.", answer
    assert chat.usage.prompt_tokens == 16, chat.usage
    print("chat:", answer)

    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=20,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    streamed = "".join(pieces)
    assert streamed == answer, (streamed, answer)
    assert len([p for p in pieces if p]) > 3, pieces
    print("streamed:", len(pieces), "chunks")

    emb = client.embeddings.create(
        model="minilm", input=["The cat sits on the mat", "A feline rests on the rug"]
    )
    a, b = emb.data[0].embedding, emb.data[1].embedding
    cos = sum(x * y for x, y in zip(a, b))
    assert len(a) == 384 and abs(cos - 0.5607) < 0.005, (len(a), cos)
    print("embeddings: cosine %.4f" % cos)

    # The client's default base64 encoding path too.
    emb64 = client.embeddings.create(model="minilm", input="The cat sits on the mat")
    assert max(abs(x - y) for x, y in zip(emb64.data[0].embedding, a)) < 1e-5

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        raise AssertionError("an unknown model must be refused")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and "no-such-model" in str(e), e
        print("error: 404", e.code if hasattr(e, "code") else "")

    try:
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "hi"}],
            temperature=9,
        )
        raise AssertionError("temperature 9 must be refused")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        print("error: 400")

    print("ok")


if __name__ == "__main__":
    main()
