"""The in-zone commands of the compute-node simulator (a simulation, not illumos).

Installed as one Python script under several names (``mdata-put``, ``halt``...) first on
the PATH of the start methods the simulated svc.startd runs. Each call is appended to
``$SIM_CALLS``. ``svcs -H -o state,fmri`` shows the states the simulated svc.startd wrote to ``$SIM_SVCS``
before the running method started; ``kstat -p -m zones -n Z -s boot_time`` prints
``$SIM_BOOT_TIME``. ``mdata-put``/``mdata-get``/``mdata-delete`` read and write the zone's
customer metadata in ``$SIM_METADATA`` (the zone's ``config/metadata.json``, on the
zone dataset as on SmartOS), which ``vmadm get`` reports. ``halt`` and ``uadmin`` halt
the zone as they do in a non-global zone: at once, killing the caller, without stop
methods (they mark ``$SIM_HALTED``, which the simulator turns into state ``stopped``).
"""

from __future__ import annotations

FAKE_COMMANDS = (
    "mdata-put",
    "mdata-get",
    "mdata-delete",
    "zonename",
    "halt",
    "uadmin",
    "shutdown",
    "poweroff",
    "reboot",
    "init",
    "svcadm",
    "svccfg",
    "svcprop",
    "svcs",
    "kstat",
    "sync",
)

SCRIPT = """#!{python}
import fcntl, json, os, signal, sys

name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["SIM_CALLS"], "a") as f:
    f.write(json.dumps({{"cmd": name, "args": args}}) + "\\n")


def metadata(update=None):
    path = os.environ["SIM_METADATA"]
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path) as f:
            data = json.load(f)
        if update is None:
            return data
        update(data.setdefault("customer_metadata", {{}}))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return data


if name == "mdata-put":
    if len(args) not in (1, 2):
        sys.exit("usage: mdata-put <keyname> [<value>]")
    value = args[1] if len(args) == 2 else sys.stdin.read()
    metadata(lambda md: md.__setitem__(args[0], value))
elif name == "mdata-get":
    value = metadata()["customer_metadata"].get(args[0])
    if value is None:
        sys.exit(1)
    print(value)
elif name == "mdata-delete":
    metadata(lambda md: md.pop(args[0], None))
elif name == "zonename":
    print(os.environ["SIM_ZONENAME"])
elif name == "svcs":  # -H -o state,fmri [FMRI...]: the simulated svc.startd's states
    with open(os.environ["SIM_SVCS"]) as f:
        states = json.load(f)
    wanted = [a for a in args if a.startswith("svc:/")]
    for fmri in wanted or sorted(states):
        if fmri in states:
            print(states[fmri], fmri)
elif name == "kstat":  # -p -m zones -n ZONENAME -s boot_time
    print("zones:1:%s:boot_time\t%s" % (os.environ["SIM_ZONENAME"], os.environ["SIM_BOOT_TIME"]))
elif name in ("halt", "uadmin", "shutdown", "poweroff", "reboot", "init"):
    open(os.environ["SIM_HALTED"], "w").close()
    os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(1)
"""
