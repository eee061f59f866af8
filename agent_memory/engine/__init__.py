"""The Prompt Baking engine (arXiv 2409.13697): turn items (facts, headlines, conversations,
prompts) into a LoRA delta.

    theta_u = argmin KL( P_live(. | u, q) || P_live+delta(. | q) )    over sampled answers to queries q

Read in this order (torch only from teacher.py on; this package and config.py never import it):
  config.py     EngineConfig, the `[bake.engine]` settings, validated by the daemon at start
  1. queries.py what to ask about each item (questions it answers, recall, reverse direction,
                fill-in-the-blank on the headline), a few about earlier items (replay, against
                forgetting) and unrelated ANCHOR queries whose teacher is the unprompted live
                model (locality)
  2. teacher.py sample answers from the live model prompted with the item (u), the first greedy,
                here or from the daemon's vLLM, and score the item's own words as the answer to a
                few questions; keep the on-topic ones and the teacher's top-k distribution at
                every answer token
  3. train.py   student: the live model (live adapter merged, frozen) + one new trainable LoRA
                delta on the MLPs
  4. train.py   loss: KL(teacher || student) over all answer tokens, the FIRST one included
  5. train.py   train: AdamW, bf16 where the CPU is fast at it (hardware.py), length-sorted
                batches, early stop at a target KL (and the FLOP accounting)
  6. probe.py   the gate's questions (gate.probe_plan), answered greedily by the live model (before
                training; the item questions also with each item in its prompt: the teacher) and
                the candidate (the new delta merged in): here, where the model already sits in
                memory, not through the model server (the gate decides on the answers, gate.py)
  7. bake.py    the stages in order; delta + bake.json + probes.json saved into OUT.partial,
                renamed to OUT at the very end
  __main__.py   `python -m agent_memory.engine JOB.json` runs one bake from a job file (the
                daemon's subprocess)
"""

PROBES_FILE = "probes.json"  # the gate's answers, beside the delta (bake.py writes it, the bakery reads it)
