#!/usr/bin/env python3
"""Writes the seed corpora (fuzz/corpus/<target>/) from the repository's
fixtures. Seeds are kept small (AFL works best on inputs of a few KB): the
AMI traces are cut into the frames the normalizer reads, one call or a few
kilobytes per seed. Run from the repository root; the output is committed,
so this only needs running again when the fixtures change."""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")

# The events Normalizer::handle reacts to (src/normalize/input.rs).
EVENTS = {
    "Newchannel", "Newstate", "Newexten", "Rename", "VarSet", "QueueCallerJoin", "QueueCallerLeave",
    "QueueCallerAbandon", "AgentCalled", "AgentRingNoAnswer", "AgentConnect", "AgentDump", "DialBegin",
    "DialEnd", "BridgeEnter", "HangupRequest", "SoftHangupRequest", "Hangup", "BlindTransfer",
    "AttendedTransfer", "QueueMemberPause", "QueueMemberStatus", "QueueMember", "QueueMemberPaused",
    "OriginateResponse",
}
VARS = {"QUEUESTATUS", "DIALSTATUS", "MIXMONITOR_FILENAME", "CALLBRIDGE_GROUP", "CALLBRIDGE_REASON",
        "CALLBRIDGE_TICKET"}
# Headers the normalizer never reads: dropped to keep seeds small.
NOISE = {"Privilege", "SystemName", "ChannelStateDesc", "ConnectedLineNum", "ConnectedLineName", "Language",
         "AccountCode", "Priority", "Context", "DestChannelStateDesc", "DestConnectedLineNum",
         "DestConnectedLineName", "DestLanguage", "DestAccountCode", "DestPriority", "DestContext",
         "CallerIDNum2", "Cause-txt"}


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def frames(raw):
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    banner, _, rest = text.partition("\n")
    return banner, [f for f in rest.split("\n\n") if f.strip()]


def slim(frame):
    lines = [l for l in frame.split("\n") if l.split(":", 1)[0] not in NOISE]
    return "\r\n".join(lines) + "\r\n\r\n"


def relevant(frame):
    h = dict(l.split(": ", 1) for l in frame.split("\n") if ": " in l)
    ev = h.get("Event")
    if ev not in EVENTS:
        return False
    return ev != "VarSet" or h.get("Variable") in VARS


def ami():
    fixtures = sorted(os.listdir(os.path.join(ROOT, "fixtures", "ami")))
    for name in fixtures:
        raw = open(os.path.join(ROOT, "fixtures", "ami", name), "rb").read()
        stem = name.split(".")[0]
        banner, fs = frames(raw)
        kept = [slim(f) for f in fs if relevant(f)]
        # The trace reader: the frames of each call (by Linkedid), whole.
        calls = {}
        for f in kept:
            m = re.search(r"Linkedid: (\S+)", f)
            calls.setdefault(m.group(1) if m else "-", []).append(f)
        for i, (lid, cf) in enumerate(sorted(calls.items())[:4]):
            data = (banner + "\r\n" + "".join(cf)).encode()
            if len(data) <= 16384:
                write("trace", f"{stem}-{i}", data)
        # The codec: the raw bytes of the trace's start (banner, login
        # reply, first frames), CRLF and LF-only.
        head = raw[:3000]
        write("ami_codec", f"{stem}-head", head)
        write("ami_codec", f"{stem}-head-lf", head.replace(b"\r\n", b"\n"))
    write("ami_codec", "latin1", b"Event: Newchannel\r\nCallerIDName: Jos\xe9\r\nLinkedid: 1.1\r\n\r\n")
    write("ami_codec", "command", b"Response: Follows\r\nPrivilege: Command\r\nline without colon\r\n--END COMMAND--\r\n\r\n")
    write("ami_codec", "garbage", b"\x00\x01 nonsense\r\n\r\nEvent: Ok\r\n\r\n\n\r\n")


def sip():
    log = open(os.path.join(ROOT, "fixtures", "sip", "asterisk20-chan_sip-dialog-2000.log"), newline="").read()
    n = 0
    for block in log.split("-" * 47):
        first, sep, rest = block.partition("\n\n")
        if not sep or "UDP message" not in first:
            continue
        msg = rest.lstrip("\n")
        h = msg.find("\r\n\r\n")
        if h < 0:
            continue
        m = re.search(r"Content-Length: *(\d+)", msg[:h])
        end = h + 4 + (int(m.group(1)) if m else 0)
        data = msg[:end].encode()
        write("sip_message", f"asterisk-{n:02}", data)
        body = data[h + 4:]
        if body.startswith(b"<?xml"):
            write("dialog_info", f"asterisk-{n:02}", body)
        n += 1
    for f in sorted(os.listdir(os.path.join(ROOT, "tests", "sipp"))):
        write("sip_message", f"sipp-{f}", open(os.path.join(ROOT, "tests", "sipp", f), "rb").read()[:4096])


def agi():
    env = ("agi_network: yes\nagi_network_script: {script}\nagi_request: agi://127.0.0.1:4573/{script}\n"
           "agi_channel: SIP/carrier00-0000000b\nagi_language: en\nagi_type: SIP\nagi_uniqueid: 1795471144.11\n"
           "agi_version: 20.5.2\nagi_callerid: 11987650001\nagi_calleridname: Cliente 0001\n"
           "agi_context: from-pstn\nagi_extension: 1130001000\nagi_priority: 3\n")
    replies = "200 result=1\nHANGUP\n200 result=1\n511 Command Not Permitted on a dead channel\n"
    write("agi_request", "route-queue", (env.format(script="route?queue=700") + "\n" + replies).encode())
    write("agi_request", "group-arg", (env.format(script="route") + "agi_arg_1: group=support\n\n200 result=1\n").encode())
    write("agi_request", "percent", (env.format(script="route?group=sup%70ort&x") + "\n520-Invalid\nusage\n520 End of proper usage.\n").encode())
    write("agi_request", "request-only", b"agi_network: yes\nagi_request: agi://127.0.0.1:4573/route?queue=701\n\n200 result=0\n")
    write("agi_request", "crlf", (env.format(script="route?queue=700").replace("\n", "\r\n") + "\r\n200 result=1\r\n").encode())


def config():
    for name in ("lab.toml", "callbridge.toml"):
        write("config", name, open(os.path.join(ROOT, "config", name), "rb").read())


if __name__ == "__main__":
    ami()
    sip()
    agi()
    config()
    for t in sorted(os.listdir(OUT)):
        files = os.listdir(os.path.join(OUT, t))
        size = sum(os.path.getsize(os.path.join(OUT, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes", file=sys.stderr)
