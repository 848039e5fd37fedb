"""What a student of ORPO need not read: the command line (cli), the run record (report),
one-line errors, safe writes and locks (safe), the run directory and its checkpoints
(checkpoint), process setup (procs), GPT-2's files (gpt2) and the synthetic task with its
judge (synthetic). The teaching core (orpo.py, model.py, prepare_data.py) calls each piece
once."""
