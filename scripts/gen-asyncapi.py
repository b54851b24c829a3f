#!/usr/bin/env python3
"""Generate docs/asyncapi.yaml from the JSON Schemas in docs/schemas/.

The payload schemas are the single source of truth (tests validate real payloads against them);
this script adds the topics, operations and MQTT bindings around them. Run it after changing a
schema or adding a command; `tests/schemas.rs` fails if the committed file is out of date.
"""
import json, os, sys
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMAS = os.path.join(ROOT, "docs", "schemas")

VERBS = ["unlock", "resident.upsert", "resident.remove", "resident.set_mode", "credential.add",
         "credential.remove", "roster.sync", "roster.batch", "rules.get", "health.get", "events.backfill", "consent.record",
         "consent.withdraw", "face.enrol"]
SITE_VERBS = [v for v in VERBS if v not in ("unlock", "face.enrol")]
EVENTS = ["access", "door", "alarm", "privacy", "system"]


def desc(name):
    with open(os.path.join(SCHEMAS, name)) as f:
        return json.load(f).get("description", "")


def ident(s):
    return "".join(p.capitalize() for p in s.replace(".", "_").split("_"))


def main():
    params = {
        "site": {"description": "Compound (site) id: 1-64 of A-Z a-z 0-9 - _"},
        "gate": {"description": "Gate id: 1-64 of A-Z a-z 0-9 - _ (not starting with _)"},
        "door": {"description": "Door name from the gate's configuration"},
    }
    gate_params = {"site": {"$ref": "#/components/parameters/site"}, "gate": {"$ref": "#/components/parameters/gate"}}
    door_params = dict(gate_params, door={"$ref": "#/components/parameters/door"})
    channels, operations, messages = {}, {}, {}

    def message(key, schema, title, retained=False, extra=None):
        m = {"name": key, "title": title, "contentType": "application/json",
             "payload": {"$ref": f"./schemas/{schema}"}}
        d = desc(schema)
        if d:
            m["summary"] = d
        b = {"payloadFormatIndicator": 1, "contentType": "application/json", "bindingVersion": "0.2.0"}
        if extra:
            b.update(extra)
        m["bindings"] = {"mqtt": b}
        messages[key] = m
        return {"$ref": f"#/components/messages/{key}"}

    def send(op, ch, qos, retain, summary, expiry=None):
        b = {"qos": qos, "retain": retain, "bindingVersion": "0.2.0"}
        if expiry is not None:
            b["messageExpiryInterval"] = expiry
        operations[op] = {"action": "send", "channel": {"$ref": f"#/channels/{ch}"}, "summary": summary,
                          "bindings": {"mqtt": b}}

    channels["status"] = {"address": "menshen/v1/{site}/{gate}/status", "parameters": gate_params,
                          "description": "Retained online/offline. `offline` is also the gate's last will.",
                          "messages": {"status": message("status", "status.json", "Gate status", True)}}
    send("publishStatus", "status", 1, True, "Retained status; the broker publishes `offline` as the last will.")
    channels["health"] = {"address": "menshen/v1/{site}/{gate}/health", "parameters": gate_params,
                          "description": "Periodic health (mqtt.health_interval_secs), not retained.",
                          "messages": {"health": message("health", "health.json", "Health report")}}
    send("publishHealth", "health", 1, False, "Periodic health: uptime, camera, outbox depth, store size, rejected inputs.")
    channels["summary"] = {"address": "menshen/v1/{site}/{gate}/summary", "parameters": gate_params,
                           "description": "Retained: the gate's state at a glance for `menshen site status` (on connect, "
                                          "with every health message, after every roster or consent change).",
                           "messages": {"summary": message("summary", "summary.json", "Gate summary", True)}}
    send("publishSummary", "summary", 1, True, "Retained summary: roster version, residents, templates, pending "
         "deletions, camera, outbox depth, last event, paged sync in progress.")
    channels["identity"] = {"address": "menshen/v1/{site}/{gate}/identity", "parameters": gate_params,
                            "description": "Retained: the Ed25519 key that signs deletion receipts, republished after "
                                           "every reconnect.",
                            "messages": {"identity": message("identity", "identity.json", "Gate identity", True)}}
    send("publishIdentity", "identity", 1, True, "Retained receipt-signing key (P7).")
    for kind in ["lock", "door", "alarm"]:
        ch = f"state{kind.capitalize()}"
        channels[ch] = {"address": f"menshen/v1/{{site}}/{{gate}}/state/{kind}/{{door}}", "parameters": door_params,
                        "description": f"Retained {kind} state, republished after every reconnect.",
                        "messages": {ch: message(ch, f"state-{kind}.json", f"{kind.capitalize()} state", True)}}
        send(f"publish{ch[0].upper()}{ch[1:]}", ch, 1, True, f"Retained {kind} state.")
    for kind in EVENTS:
        ch = f"event{kind.capitalize()}"
        channels[ch] = {"address": f"menshen/v1/{{site}}/{{gate}}/event/{kind}", "parameters": gate_params,
                        "description": "Durable events (stored with fdatasync before publishing), QoS 1, never "
                                       "retained, at least once: de-duplicate by `id`, order by `seq`.",
                        "messages": {ch: message(ch, f"event-{kind}.json", f"{kind} event")}}
        send(f"publish{ch[0].upper()}{ch[1:]}", ch, 1, False, f"{kind} events from the durable outbox.")
    channels["reply"] = {"address": None,
                         "description": "Where a command's reply goes: the MQTT 5 response topic (with the request's "
                                        "correlation data echoed), or the payload's `reply_to` (MQTT 3.1.1).",
                         "messages": {"reply": message("reply", "reply.json", "Command reply", extra={
                             "correlationData": {"type": "string", "description": "the request's correlation data"}})}}
    for verb in VERBS:
        key = "cmd" + ident(verb)
        schema = f"cmd-{verb}.json"
        extra = {"responseTopic": {"type": "string", "description": "MQTT 5 response topic"},
                 "correlationData": {"type": "string", "description": "MQTT 5 correlation data (the request id when "
                                                                      "the payload has none)"}}
        channels[key] = {"address": f"menshen/v1/{{site}}/{{gate}}/cmd/{verb}", "parameters": gate_params,
                         "description": desc(schema),
                         "messages": {key: message(key, schema, f"cmd/{verb}", extra=extra)}}
        b = {"qos": 1, "retain": False, "bindingVersion": "0.2.0"}
        if verb == "unlock":
            # An unlock must expire: this is the longest expiry the gate accepts by default
            # (mqtt.max_command_lifetime_ms); without one (or expires_at) it is refused.
            b["messageExpiryInterval"] = 300
        operations[key] = {
            "action": "receive", "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"{verb}: refused if retained, expired, repeated, malformed or oversize.",
            "bindings": {"mqtt": b},
            "reply": {"address": {"location": "$message.payload#/reply_to",
                                  "description": "MQTT 5: the response topic property; MQTT 3.1.1: reply_to"},
                      "channel": {"$ref": "#/channels/reply"}},
        }
    site_msgs = {("cmd" + ident(v)): {"$ref": f"#/components/messages/cmd{ident(v)}"} for v in SITE_VERBS}
    channels["siteCommand"] = {
        "address": "menshen/v1/{site}/_site/cmd/{verb}",
        "parameters": {"site": {"$ref": "#/components/parameters/site"},
                       "verb": {"enum": SITE_VERBS, "description": "any command but unlock (unlock is per gate)"}},
        "description": "Site-wide commands: every gate of the site obeys, and each replies with its own gate id.",
        "messages": site_msgs}
    operations["siteCommand"] = {
        "action": "receive", "channel": {"$ref": "#/channels/siteCommand"},
        "summary": "A roster update that reaches every gate of a compound.",
        "bindings": {"mqtt": {"qos": 1, "retain": False, "bindingVersion": "0.2.0"}},
        "reply": {"address": {"location": "$message.payload#/reply_to"}, "channel": {"$ref": "#/channels/reply"}}}

    with open(os.path.join(SCHEMAS, "error-codes.json")) as f:
        codes = json.load(f)
    doc = {
        "asyncapi": "3.1.0",
        "info": {
            "title": "Menshen gate controller MQTT API",
            "version": "1.0.0",
            "description": (
                "Everything a building management system needs to run a Menshen gate. Topics live under "
                "`menshen/v1/{site}/{gate}/`. Commands are validated strictly; each gets a reply with `ok` and a "
                "`result`, or an error `code` and `message`. Error codes: " + ", ".join(f"`{c}`" for c in codes) +
                ". Retained commands, expired commands and repeated request ids are refused: nothing old can be "
                "replayed into an unlock. No image and no face template is ever published. See docs/mqtt.md."),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "broker.example:8883", "protocol": "mqtt", "protocolVersion": "5",
                "description": "The site's broker. TLS with a pinned CA and client certificates, or username/password. "
                               "No default credentials.",
                "security": [{"$ref": "#/components/securitySchemes/clientCertificate"},
                             {"$ref": "#/components/securitySchemes/userPassword"}],
                "bindings": {"mqtt": {"clientId": "menshen-{site}-{gate}", "cleanSession": True, "keepAlive": 15,
                                      "lastWill": {"topic": "menshen/v1/{site}/{gate}/status", "qos": 1,
                                                   "message": "{\"state\":\"offline\"}", "retain": True},
                                      "bindingVersion": "0.2.0"}},
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "parameters": params,
            "messages": messages,
            "securitySchemes": {
                "clientCertificate": {"type": "X509", "description": "mqtt.tls.client_cert_file / client_key_file"},
                "userPassword": {"type": "userPassword", "description": "mqtt.username / mqtt.password_file"},
            },
        },
    }
    out = "# Generated by scripts/gen-asyncapi.py from docs/schemas/*.json: edit those, then re-run it.\n"
    out += yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)
    path = os.path.join(ROOT, "docs", "asyncapi.yaml")
    if len(sys.argv) > 1 and sys.argv[1] == "--check":
        with open(path) as f:
            if f.read() != out:
                sys.exit("docs/asyncapi.yaml is out of date: run scripts/gen-asyncapi.py")
        return
    with open(path, "w") as f:
        f.write(out)


if __name__ == "__main__":
    main()
