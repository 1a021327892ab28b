import json
import time

import torch

torch.set_num_threads(2)
from benchmarks.machine import machine
from pipeline.data import realtimeqa
from pipeline.evaluate import evaluate
from pipeline.model.mac import MACModel
from pipeline.scoring import EvalSettings

model = MACModel.load("checkpoints/mac-readout-smollm2-minilm")
docs, qs = realtimeqa.load([2024])
t0 = time.time()
rep = evaluate(model, docs, qs, EvalSettings(modes=("rag@1", "mac+rag@1", "select+rag@1"), top_k=4, retention=False, limit=300))
rows = rep.pop("rows")
rep["seconds"] = time.time() - t0
rep["how"] = {"machine": machine(), "checkpoint": model.version, "answer_prompt": model.prompt_version, "threads": 2,
              "command": "pipeline.evaluate.evaluate(shipped checkpoint, RealTimeQA 2024 (all 2024 documents in memory), EvalSettings(modes=('rag@1','mac+rag@1','select+rag@1'), top_k=4, retention=False, limit=300)) — /tmp script, see notes.md"}
json.dump(rep, open("/tmp/ts/rtqa300.json", "w"), indent=2, default=str)
print(json.dumps(rep["metrics"], default=str))
