"""One tiny run with weighted_captions and enable_wildcard: the loop hands drawn captions to a weighting
conditioner, and sample prompts go through the weighted sample encoding."""

from __future__ import annotations

from loracli.run.conditioning import Conditioner
from tests.smoke.test_train import train


def test_weighted_wildcard_captions_reach_the_text_encoder(smoke_project, monkeypatch):
    data = smoke_project.parent / "data"
    for caption in sorted(data.rglob("*.txt")):
        i = int(caption.stem)
        caption.write_text(f"(thing{i}:1.3), {{red|blue}}\nalt {{x|y}} line{i}\n")
    (smoke_project.parent / "prompts.txt").write_text("(thing0:1.4), cat --w 64 --h 64 --s 2 --d 1\n")

    encoded: list[tuple[bool, str]] = []
    sampled: list[tuple[bool, str]] = []
    encode, encode_sample = Conditioner.encode, Conditioner.encode_sample

    def spy_encode(self, captions, device):
        encoded.extend((self.weighted, c) for c in captions)
        return encode(self, captions, device)

    def spy_sample(self, prompt, negative, device):
        sampled.append((self.weighted, prompt))
        return encode_sample(self, prompt, negative, device)

    monkeypatch.setattr(Conditioner, "encode", spy_encode)
    monkeypatch.setattr(Conditioner, "encode_sample", spy_sample)
    train(smoke_project, "--set", "training.weighted_captions=true", "--set", "dataset.enable_wildcard=true",
          "--set", "training.max_train_epochs=1", "--set", "sample.sample_prompts='prompts.txt'",
          "--set", "sample.sample_at_first=true")

    assert encoded and all(weighted for weighted, _ in encoded)
    captions = {c for _, c in encoded}
    assert not any("{" in c or "\n" in c for c in captions)  # every caption was drawn before encoding
    firsts = {c for c in captions if c.startswith("(thing")}
    alts = captions - firsts
    assert {c.rsplit(", ", 1)[1] for c in firsts} == {"red", "blue"}
    assert alts and all(c.startswith(("alt x line", "alt y line")) for c in alts)
    assert sampled == [(True, "(thing0:1.4), cat")]
