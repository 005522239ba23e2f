"""`bagel-titan-from-lmms CONFIG.yaml > train.toml`: an LMMS Engine BAGEL training YAML as a
bagel-titan TOML.

Modules, in the order a conversion runs: `shapes` (the two YAML shapes), `model`, `datasets`,
`trainer_args` (one handler per training argument), `convert` (all of them into a `record`),
`emit` (TOML and the stderr summary), `cli`.

Both YAML shapes are read: the list form (``- type: trainer`` / ``config:``, training arguments
beside ``dataset_config`` and ``model_config``) and the plain mapping (training arguments under
``trainer_args``). Every key ends up in one of three places:

- mapped: a TOML assignment, commented with the LMMS key it came from;
- translated: mapped to what bagel-titan does where the literal value would train differently
  (pure-bf16 parameters, HF Trainer defaults that differ from bagel-titan's, batch size vs one
  pack per microbatch), with a ``NOTE`` comment above it explaining the difference;
- not converted: listed at the end of the TOML with the reason (no equivalent, no effect here,
  unknown key), and summarised on stderr.

HF Trainer defaults that change the training (AdamW betas/epsilon, the linear schedule, seed,
checkpointing every 500 steps, batch size 8) are written out when the YAML relies on them, since
bagel-titan's own defaults differ. The result is loaded with the real config loader before it
is printed, so what comes out is a valid config.
"""
