"""Run under torchrun by test_timeouts.py: rank 1 stops itself (SIGSTOP) before a collective that rank 0 enters.

Args: ckpt_dir tokenizer_path pid_dir where, where "broadcast" (broadcast_from_main), "generate" (a forward's
model-parallel all-reduce) or "engine" (the continuous-batching engine's step plan, which rank 1 should follow).
Each rank writes its pid to pid_dir/RANK, so the test can watch rank 0 and kill rank 1.
where="patient" stops no one: rank 0 waits longer than the timeout, as for a person, before a patient broadcast.
"""

import os
import signal
import sys
import time

import torch

from llama import Llama
from llama.distributed import broadcast_from_main, collective, start_patient_broadcasts
from llama.engine.batching import Engine


@collective("a generation step (the model-parallel all-reduce)")  # as the example scripts' main
def main(ckpt_dir: str, tokenizer_path: str, pid_dir: str, where: str) -> None:
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=1, device="cpu", dtype=torch.float32, timeout_s=5
    )
    broadcast_from_main("both ranks are up")  # so rank 0 is past build before rank 1 stops
    if where == "patient":  # as chat_loop does
        start_patient_broadcasts()
        if int(os.environ["RANK"]) == 0:
            time.sleep(7)  # the chat's person, thinking for longer than timeout_s
        line = broadcast_from_main("the next line", patient=True)
        generator.text_completion([line], temperature=0, max_gen_len=2)  # the ranks still agree afterwards
        print(f"RANK {os.environ['RANK']} GOT {line!r}", flush=True)
        # Leave together, as tests/mp_worker.py does: a rank tearing down its gloo groups while the other is
        # still in a collective aborted once at exit ("terminate called without an active exception").
        torch.distributed.barrier()
        return
    engine = Engine.for_llama(generator) if where == "engine" else None  # a collective: before rank 1 stops
    rank = os.environ["RANK"]
    with open(os.path.join(pid_dir, rank + ".tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(pid_dir, rank + ".tmp"), os.path.join(pid_dir, rank))  # never seen half written
    if rank == "1":
        os.kill(os.getpid(), signal.SIGSTOP)
    if where == "broadcast":
        broadcast_from_main("a line")
    elif where == "generate":
        generator.text_completion(["Llamas live in"], temperature=0, max_gen_len=4)
    elif where == "engine":
        engine.submit("Llamas live in").result()  # the step's plan reaches no one: the request fails with the error
    else:
        raise ValueError(f"where must be 'broadcast', 'generate' or 'engine', got {where!r}")
    print("RANK 0 WAS NOT STOPPED", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
