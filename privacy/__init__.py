"""privacy: the release gate. Probes a trained model for memorised records and blocks release when it leaks.

What lives where (maths in pure functions, the model forward in one place, I/O at the edges):

- ``metrics``      AUC, TPR at FPR, bootstrap and family-wise intervals, Min-K%, Min-K%++, exposure, skew-normal
- ``scoring``      per-token log-probabilities (and Min-K%++'s mean/sd) of subjects, cut into windows like training
- ``mia``          membership inference: attack scores, balanced members/non-members, risk slices
- ``canaries``     plant synthetic subjects in the tokenized train split; their exposure after training
- ``extraction``   prompt with a member's first k events; exact / near-exact / k-eidetic continuations
- ``vocab_floor``  every token covers >= K real train subjects, recounted from the shards
- ``synthetic``    distance to closest record and exact copies for generated timelines
- ``gate``         PASS / REVIEW / FAIL per probe from ``gate_defaults.toml`` (the one thresholds file)
- ``report``       report.json and the HTML model card
- ``audit``        runs every probe on a model + its data and writes the report
- ``release``      model checksum; copy into a registry only after a signed, passing audit of exactly that model
                   (or a REVIEW a reviewer approved, signed)
- ``signing``      Ed25519 keys (``foresight keys init``), signatures over canonical JSON, report.sig.json
- ``registry``     the registry's index: hash-chained (foresight.chain), signed records, pinned trusted keys
- ``verify``       ``foresight registry verify``: chain, signatures and released files re-checked
"""
