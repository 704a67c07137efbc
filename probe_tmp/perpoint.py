import sys, time, functools, os, json, resource
sys.path.insert(0, 'scripts'); sys.path.insert(0, '.')
from bench_sweep_mpi import sweep_argv
import mc2sim.cli as cli, mc2sim.study.simulate as ss
times = {}
sim, enc = ss.simulate_study, ss.encode_study
cur = {}
def s2(scenario, topology, world):
    t = time.perf_counter(); r = sim(scenario, topology, world); cur['t'] = time.perf_counter() - t; cur['label'] = id(r); return r
def e2(result, **k):
    t = time.perf_counter(); f = enc(result, **k); times[len(times)] = (cur['t'], time.perf_counter() - t); return f
ss.simulate_study, ss.encode_study = s2, e2
import io, contextlib
out = sys.argv[1]; tag = sys.argv[2]
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    cli.main(sweep_argv(200) + ['--out', out, '--overwrite'])
r1 = resource.getrusage(resource.RUSAGE_SELF)
rank = os.environ.get('OMPI_COMM_WORLD_RANK') or os.environ.get('PMI_RANK') or '0'
sim_t = sum(a for a, b in times.values()); enc_t = sum(b for a, b in times.values())
print(tag, rank, f"points {len(times)} sim {sim_t:.2f} enc {enc_t:.2f} wall {time.perf_counter()-t0:.2f} user {r1.ru_utime-r0.ru_utime:.2f} sys {r1.ru_stime-r0.ru_stime:.2f} maxrss {r1.ru_maxrss/1024:.0f}MB", flush=True)
