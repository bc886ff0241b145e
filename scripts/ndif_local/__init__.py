"""A local, CPU-only NDIF server: the real ``ndif`` server software, for tests and offline runs.

NDIF is the service behind nnsight's ``remote=True``. Its server is on PyPI (``ndif``), and runs on this
kind of machine without a GPU, given a few settings that this package applies. The stack:

    moto_server   S3-compatible object store (results larger than the websocket's limit)
    redis-server  request queue and response pub/sub
    ray head      Ray node (GCS, raylet, dashboard: ndif's controller reads Ray's state API)
                  + the NDIF controller (a detached Ray actor) + one model actor per deployed model
    ndif API      gunicorn serving the FastAPI app; the client talks to it over HTTP and websockets

Subcommands (``python scripts/ndif_local.py --help``, or ``python -m ndif_local`` from scripts/):

    install                   redis-server (apt-get, as root), a server venv (Python 3.12, pinned ndif,
                              nnsight, ray, torch, transformers) and an object-store venv (pinned moto),
                              cached under ${TASKVEC_CACHE:-~/.cache/taskvec}/ndif/ and reused.
    start  --dir RUNDIR       start the stack; every file it writes stays under RUNDIR.
    deploy --dir RUNDIR F...  serve local model folders (config.json + safetensors + tokenizer).
    status --dir RUNDIR       what runs, and the deployed models.
    stop   --dir RUNDIR       stop this stack's processes (only them: never ``ray stop``).
    env    --dir RUNDIR       the stack's environment as shell exports (to run ``ndif`` commands by hand).
    watch  --dir RUNDIR --pid P   stop the stack once process P has gone (the test fixture's guard).

The modules:

    pins.py       every version the server is built from, once (nnsight, torch and transformers are read
                  from the project's requirements.txt: the server runs what the client runs)
    install.py    the server's Python, redis-server, the cached venvs
    cpu_actor.py  the CPU model actor; runs inside the server, copied to RUNDIR/shim at start
    venv_check.py run by each venv's own Python after building it: the pins hold, the modules import
    stack.py      ports, the stack's environment (the settings the server needs here), start/stop/status
    deploy.py     the model key a client computes, the deploy spec, ``ndif deploy``
    procs.py      processes (psutil): spawn in a session, find a stack's processes, stop them; waiting
    cli.py        the command line

The services are launched as ndif's own ``ndif start`` and ``start.sh`` scripts would (same commands and
settings), but each with explicit ports and in its own session, so that ``stop`` finds every process of
this stack, and only those, by session id (Ray's daemons and workers stay in the session of ``ray start``)
or by the tag in their environment. RUNDIR/stack.json records the ports, sessions and models; RUNDIR/logs
has the logs.

The workarounds the server needs here are settings only; no file of ndif, nnsight or ray is changed:

* the stock model actor requires CUDA: a small subclass that loads and runs on the CPU (cpu_actor.py) is
  copied to RUNDIR/shim and selected with NDIF_MODEL_IMPORT_PATH (and ``actor_class`` when deploying);
* the controller places models only on nodes with a Ray ``GPU`` resource sized by ``cuda_memory_bytes``:
  the Ray node advertises a fake one (RAY_OVERRIDE_RESOURCES and ``--resources``);
* deploying with a model key computed by the controller fails for ndif 0.1.2 with nnsight 0.8.1, and
  would go to the Hub: ``deploy`` gives the key, size, dtype and actor class explicitly;
* gunicorn writes a control socket into the home folder, Ray into /tmp/ray, the ndif CLI into ~/.ndif:
  HOME, TMPDIR, NDIF_HOME and Ray's temp dir all point into RUNDIR, and gunicorn runs without the socket;
* every port is chosen free at start (or given; a restart in the same RUNDIR keeps its ports), so the
  stack does not clash with another one;
* Ray binds several of its services on every interface whatever its flags say, and they have no
  authentication: as root, the stack runs in a network namespace of its own whose only interface is
  loopback, and a bridge relays the API, object-store and redis ports from this machine's 127.0.0.1
  (netns.py). ``start`` refuses to report the stack started while any of its processes can be reached
  from outside (without root: it stops, saying why);
* redis runs without persistence (``--save ""``), so it writes no dump file;
* never ``ray stop`` (nor ``ndif stop ray``, which runs ``ray stop --force``): it kills every Ray process
  on the host by name. ``stop`` ends this stack's processes by PID.

The harness runs on the project's Python (its venv: psutil); the server runs in its own venvs.
"""
