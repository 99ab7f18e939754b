"""
Ablation studies: a grid of short trainings, each given the same wall-clock budget and the same evaluation --
val bits per byte on the same held-out stories, comparable across vocabularies -- to find what gives the best
model per CPU-minute.

    python ablate.py config/ablate_recipe.py                # run the grid (an interrupted grid continues)
    python ablate.py config/ablate_sizes.py --budget=1      # another grid, one minute a cell
    python ablate.py config/ablate_recipe.py --report_only  # the table and plots of the cells finished so far
    python ablate.py config/ablate_tune.py                  # 1,200 iterations a cell, two cells at a time

Each cell is one `train.py` process (the training code itself: no second loop here) run with the grid's
base arguments, `--max_time=budget` (or `--max_iters=iters`: the same steps for every cell, which may then run
`jobs` at a time), and the cell's own settings; `vocab_size` is the one setting that is
not train.py's: a cell with it trains on the bundled corpus prepared with a vocabulary of that size (0: GPT-2's),
made once by prepare.py and shared. A finished cell is never run again (its line in results.jsonl says so);
an interrupted one continues from its last checkpoint. out_dir/<grid> receives a directory per cell (the run),
results.jsonl (a line per cell: settings, parameters, tokens seen, wall time, val bits/byte), results.md (the
table, best first by the whole val split's bits/byte) and the plots: val bits/byte against wall-clock for every
cell, and against each numeric setting of the grid (one line per value of a second setting, where there is one).

A grid config assigns `name`, `base`, `budget` and either `cells` (a list of (name, {setting: value}))
or `axes` (a list of (setting, [values]); the grid is their product).

Two scores a cell: train.py's last `val_bpb`, an estimate from eval_iters random batches (of the run's own
batch size, drawn with its seed), and `split_bpb`, the final model over the whole val split, every token once
(training.final_bits_per_byte) -- the same text for every cell whatever its vocabulary, batch or seed. Cells are
ranked by the second: the first moved 4% with the seed alone in docs/ablate.md's round 5.
"""
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from checkpoint import read_config, read_log
from configurator import ConfigError, configure, settings_of
from files import atomic_write
from model import GPT, GPTConfig
from training import bundled_data_dir, final_bits_per_byte

ROOT = os.path.dirname(os.path.abspath(__file__))

# --- settings -------------------------------------------------------------------------------------------
name = "ablate"  # the grid's name: its results go to out_dir/name
out_dir = "out"  # where grids go
data_root = "data"  # where the corpus prepared at each vocab_size goes (data_root/bundled_bpe<N>)
base = ["config/quickstart.py"]  # train.py arguments every cell shares (config files, --key=value)
budget = 3.0  # minutes of wall-clock per cell (train.py --max_time)
iters = 0  # instead of budget: this many optimizer steps per cell (train.py --max_iters); 0: use budget
jobs = 1  # cells run at once, each with cores / jobs threads -- only with iters: timed cells need the machine alone
cells = []  # [(cell name, {setting: value})]; or leave empty and give axes
axes = []  # [(setting, [values])]: one cell per combination
report_only = False  # write the table and plots from the finished cells, run nothing
# --------------------------------------------------------------------------------------------------------


def grid_cells():
    """[(cell name, {setting: value})] of the grid, in order."""
    if cells and axes:
        raise ConfigError("give cells or axes, not both")
    if cells:
        return [(str(cell), dict(settings)) for cell, settings in cells]
    if not axes:
        raise ConfigError("the grid is empty: give cells=[(name, {setting: value}), ...] or axes=[(setting, [...])]")
    keys = [key for key, _ in axes]
    return [("_".join(f"{k}{v}" for k, v in zip(keys, values)), dict(zip(keys, values)))
            for values in itertools.product(*(values for _, values in axes))]


def train_arguments(settings, run_dir):
    """train.py's arguments for a cell: the base, the budget, the cell's settings (vocab_size -> data_dir)."""
    limit = ["--max_time=0", f"--max_iters={iters}"] if iters else [f"--max_time={budget}"]
    args = list(base) + [f"--out_dir={run_dir}", *limit, "--init_from=auto"]
    for key, value in settings.items():
        if key == "vocab_size":
            args.append(f"--data_dir={bundled_data_dir(data_root, value)}")
        else:
            args.append(f"--{key}={value}")
    return args


def cell_result(cell, settings, run_dir, args, wall):
    """What a finished cell measured, from its checkpoint and log."""
    config = read_config(os.path.join(run_dir, "last"))
    model = GPT(GPTConfig(**config["model"]))
    evals = [r for r in read_log(run_dir) if "val_bpb" in r]
    final = evals[-1]
    return {"cell": cell, "settings": settings, "args": args, "params": model.num_params(False),
            "params_no_embeddings": model.num_params(), "vocab": config["model"]["vocab_size"],
            "iters": final["iter"], "tokens": final["tokens"], "seconds": final.get("time", wall),
            "val_bpb": final["val_bpb"], "best_val_bpb": min(r["val_bpb"] for r in evals),
            "val_loss": final["val_loss"], "train_loss": final["train_loss"], "split_bpb": final_bits_per_byte(run_dir)}


def run_cell(cell, settings, grid_dir, threads):
    """Train one cell to the end (continuing a run stopped part-way); its result, or None if train.py failed."""
    run_dir = os.path.join(grid_dir, cell)
    args = train_arguments(settings, run_dir)
    marker = os.path.join(run_dir, "cell.json")  # the arguments the run in run_dir was started with
    if os.path.isfile(marker) and json.load(open(marker)) != args:
        shutil.rmtree(run_dir)  # the cell's settings changed: its old run cannot be continued
    os.makedirs(run_dir, exist_ok=True)
    atomic_write(marker, json.dumps(args).encode())
    started = time.time()
    extra = [f"--num_threads={threads}"] if threads else []  # how it runs, not what it computes: not in args
    with open(os.path.join(run_dir, "train.out"), "a") as out:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, *extra], stdout=out,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        tqdm.write(f"{cell}: train.py stopped or failed (exit {proc.returncode}); see {run_dir}/train.out")
        return None
    return cell_result(cell, settings, run_dir, args, time.time() - started)


def record(grid_dir, done, result):
    """result as its cell's latest: in done, and as a new line of results.jsonl (read_results keeps the last)."""
    done[result["cell"]] = result
    with open(os.path.join(grid_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")


def run_grid(grid_dir, todo, done):
    """Run each cell of todo not in done (results.jsonl), jobs at a time, appending each result as it
    finishes."""
    if jobs < 1 or (jobs > 1 and not iters):
        raise ConfigError(f"jobs={jobs}: cells sharing the machine get fewer steps in a time budget; run them "
                          "in parallel only with an iteration budget (iters=N)")
    pending = [(cell, settings) for cell, settings in todo
               if done.get(cell, {}).get("args") != train_arguments(settings, os.path.join(grid_dir, cell))]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    bar = tqdm(total=len(todo), initial=len(todo) - len(pending), desc=name, unit="cell")
    with ThreadPoolExecutor(jobs) as pool:  # threads that each wait on a train.py process
        futures = [pool.submit(run_cell, cell, settings, grid_dir, threads) for cell, settings in pending]
        for future in as_completed(futures):
            result = future.result()
            bar.update(1)
            if result is None:
                continue
            record(grid_dir, done, result)
            tqdm.write(f"{result['cell']}: val {result['split_bpb']:.4f} bits/byte (whole split; train.py "
                       f"{result['val_bpb']:.4f}), {result['params'] / 1e6:.2f}M "
                       f"parameters, {result['tokens'] / 1e6:.1f}M tokens in {result['seconds'] / 60:.1f} min")
    bar.close()


def read_results(grid_dir):
    """{cell: its latest result} from results.jsonl."""
    done = {}
    path = os.path.join(grid_dir, "results.jsonl")
    if os.path.isfile(path):
        for line in open(path):
            if line.strip():
                record = json.loads(line)
                done[record["cell"]] = record
    return done


def score_older_cells(grid_dir, done):
    """A cell recorded before results carried split_bpb gets it now, from its run."""
    for cell, result in list(done.items()):
        if "split_bpb" not in result and os.path.isdir(os.path.join(grid_dir, cell, "last")):
            record(grid_dir, done, dict(result, split_bpb=final_bits_per_byte(os.path.join(grid_dir, cell))))


def per_cell():
    return f"{iters} iterations" if iters else f"{budget:g} minutes"


# --- the report -----------------------------------------------------------------------------------------

def write_table(grid_dir, results):
    """results.md: a row per cell, best first; a column per axis of an axes grid, the changed settings of a
    cells grid in one column."""
    keys = [k for k, _ in axes]
    header = ["cell", *(keys or ["settings"]), "params", "tokens", "minutes", "val bpb (whole split)",
              "val bpb (train.py)", "best (train.py)"]
    described = (lambda r: [str(r["settings"].get(k, "")) for k in keys]) if keys else (
        lambda r: [" ".join(f"{k}={v}" for k, v in r["settings"].items()) or "(base)"])
    rows = [[r["cell"], *described(r), f"{r['params'] / 1e6:.2f}M",
             f"{r['tokens'] / 1e6:.1f}M", f"{r['seconds'] / 60:.1f}", f"{r['split_bpb']:.4f}", f"{r['val_bpb']:.4f}",
             f"{r['best_val_bpb']:.4f}"] for r in sorted(results, key=lambda r: r["split_bpb"])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = (f"# {name}: {per_cell()} a cell, base {' '.join(base)}\n\n" + "\n".join(lines) + "\n")
    atomic_write(os.path.join(grid_dir, "results.md"), text.encode())
    return text


def write_plots(grid_dir, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evals = {r["cell"]: [e for e in read_log(os.path.join(grid_dir, r["cell"])) if "val_bpb" in e and "time" in e]
             for r in results}
    fig, ax = plt.subplots(figsize=(8, 5))  # every cell's val bits/byte against wall-clock
    for r in sorted(results, key=lambda r: r["split_bpb"]):
        ax.plot([e["time"] / 60 for e in evals[r["cell"]]], [e["val_bpb"] for e in evals[r["cell"]]], "o-", ms=3,
                label=f"{r['cell']} ({r['split_bpb']:.3f} whole split)")
    later = [e["val_bpb"] for cell_evals in evals.values() for e in cell_evals if e["iter"] > 0]
    if later:  # the step-0 evaluations (about 3 bits/byte) would flatten the part worth reading
        ax.set_ylim(min(later) - 0.02, max(later) + 0.02)
    ax.set_xlabel("wall-clock (minutes)")
    ax.set_ylabel("val bits per byte (train.py's estimate)")
    ax.set_title(f"{name}: val bits/byte against time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(grid_dir, "bpb_vs_time.png"), dpi=110)
    plt.close(fig)
    keys = [k for k, _ in axes] if axes else sorted({k for r in results for k in r["settings"]})
    for key in keys:  # against each numeric setting, one line per value of another setting
        values = [r for r in results if isinstance(r["settings"].get(key), (int, float))]
        if len({r["settings"][key] for r in values}) < 2:
            continue
        other = next((k for k in keys if k != key), None)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for group in sorted({str(r["settings"].get(other)) for r in values}):
            points = sorted((r["settings"][key], r["split_bpb"]) for r in values
                            if str(r["settings"].get(other)) == group)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{other}={group}" if other else None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(key)
        ax.set_ylabel(f"val bits per byte (whole split) after {per_cell()}")
        ax.grid(alpha=0.3)
        if other:
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(grid_dir, f"bpb_vs_{key}.png"), dpi=110)
        plt.close(fig)


def main():
    todo = grid_cells()
    grid_dir = os.path.join(out_dir, name)
    os.makedirs(grid_dir, exist_ok=True)
    done = read_results(grid_dir)
    if not report_only:
        run_grid(grid_dir, todo, done)
    score_older_cells(grid_dir, done)
    results = [done[cell] for cell, _ in todo if cell in done and "split_bpb" in done[cell]]
    if not results:
        print("no cell has finished yet")
        return
    print(write_table(grid_dir, results))
    write_plots(grid_dir, results)
    print(f"wrote {grid_dir}/results.md, results.jsonl and the plots (bpb_vs_*.png); "
          f"{len(results)} of {len(todo)} cells done")


if __name__ == "__main__":
    try:
        globals().update(configure(settings_of(globals()), sys.argv[1:], __file__))
        main()
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, ...
        sys.exit(f"error: {e}")
