"""Answer a few chat dialogs with a Llama 2 chat model (the built-in demo model when no checkpoint is given).

    python example_chat_completion.py
    torchrun --nproc_per_node 1 example_chat_completion.py llama-2-7b-chat/ tokenizer.model
"""

from typing import List, Optional

from llama import Dialog
from llama.cli import build_generator
from llama.commandline import fire_checked
from llama.distributed import collective, is_main_process
from llama.interactive import chat_loop

# The dialogs this example answers (tools/finetune_demo_chat.py samples the demo model on them too).
DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "What should I pack for a weekend of hiking?"}],
    [
        {"role": "user", "content": "Can you suggest a name for a grey cat?"},
        {"role": "assistant", "content": "How about Pebble? It is short, friendly and fits a grey coat."},
        {"role": "user", "content": "Nice. Give me two more in the same style."},
    ],
    [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "system", "content": "You are a patient teacher who explains with everyday examples."},
        {"role": "user", "content": "What is compound interest?"},
    ],
    [
        {"role": "system", "content": "Reply only with rhyming couplets."},
        {"role": "user", "content": "Describe a rainy morning."},
    ],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@collective("a collective between the ranks (the model-parallel all-reduce)")
def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    timeout_s: Optional[float] = None,
    quantize: Optional[str] = None,
    interactive: bool = False,
    system: Optional[str] = None,
) -> None:
    """Answer the example dialogs below and print each dialog with the model's reply, or chat interactively.

    Dialogs are sent in batches of at most max_batch_size, so any batch size works.

    Args:
        ckpt_dir: folder with params.json and consolidated.NN.pth; omit both paths for the demo model.
        tokenizer_path: the tokenizer.model of the checkpoint.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling threshold.
        max_seq_len: longest dialog plus answer.
        max_batch_size: most dialogs per batch.
        max_gen_len: most tokens per answer; defaults to max_seq_len - 1.
        device: "cpu", "cuda" or "cuda:N"; defaults to cuda:LOCAL_RANK when CUDA is available.
        dtype: "float32", "float16" or "bfloat16"; defaults to float16 on CUDA and bfloat16 on CPU.
        compile: decode on the opt-in fast path (static shapes, torch.compile); same tokens, faster.
        timeout_s: seconds a rank waits for the others in a collective before the job fails naming them
            (default 300, see llama.distributed.DEFAULT_TIMEOUT_S); waiting for your next chat line is not limited.
        quantize: "int8" or "int4": weight-only quantization of the linear layers while loading (see
            llama/quant/); a checkpoint written by `python -m llama.quantize` needs no flag.
        interactive: chat in the terminal instead, streaming each answer (/reset, /exit, Ctrl-C, Ctrl-D).
        system: a system prompt for the interactive chat.
    """
    generator = build_generator(
        ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype, compile, timeout_s, quantize
    )
    if interactive:
        chat_loop(generator, system=system, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        return

    for start in range(0, len(DIALOGS), max_batch_size):
        batch = DIALOGS[start : start + max_batch_size]
        results = generator.chat_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        if is_main_process():
            for dialog, result in zip(batch, results):
                for msg in dialog:
                    print(f"{msg['role'].capitalize()}: {msg['content']}\n")
                reply = result["generation"]
                print(f"> {reply['role'].capitalize()}: {reply['content']}")
                print("\n==================================\n")


if __name__ == "__main__":
    fire_checked(main)
