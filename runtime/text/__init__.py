"""Text conditioning, as the A1111 web UI reads a prompt: tokenizer, attention syntax, prompt
editing / alternation / AND schedule, extra-network tags, textual-inversion embeddings, and the
75-token chunks that go through the text encoder."""
