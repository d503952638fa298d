"""MUSTARD-style generation: concept seeds -> an author model writes a problem, an informal proof and a
Lean 4 proof -> Lean checks it -> revisions with Lean's messages -> records that Lean accepted.

- `concepts.py`: the seed concepts by educational level (`concepts.yaml` shipped) and their expansion;
- `texts.py`: the answer format, the Lean file it carries, the feedback shown to the author;
- `pipeline.py`: the generate-check-revise loop, the rows of a release and its counts.

The flow (`flows/mustard.py`, `stepforge mustard`) runs the loop per shard and commits a release.
"""
