// Validates the custom resources of rendered manifests offline, strictly.
// Written by `cargo xtask deploy-check` next to its npm packages and run as
//   node crd-check.mjs <objects.json> <schemas dir>
// where objects.json is an overlay's rendered objects as a JSON array.
//
// - Istio and prometheus-operator objects: the schemas of
//   @kubernetes-models/istio and @kubernetes-models/prometheus-operator.
//   Those schemas accept unknown fields, so on top of them every field of
//   the object must be one the schema looks at: the object is validated
//   through a proxy that records which fields the schema reads, and a
//   field it never reads is one it does not know (a typo, or a field of
//   another version).
// - CloudNativePG objects: our own closed JSON schema
//   (deploy/schemas/postgresql.cnpg.io-v1.json), with Ajv.
// - Kubernetes' own kinds are left to kubernetes-validate; any other
//   apiVersion is an error (no schema, no proof).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import Ajv from "ajv";

const [objectsFile, schemasDir] = process.argv.slice(2);
const objects = JSON.parse(readFileSync(objectsFile, "utf8"));

const PACKAGES = [
  [/\.istio\.io$/, "@kubernetes-models/istio"],
  [/^monitoring\.coreos\.com$/, "@kubernetes-models/prometheus-operator"],
];
const BUILT_IN = /^(|apps|batch|policy|autoscaling|[a-z.]*\.k8s\.io)$/;
const TOP_LEVEL = new Set(["apiVersion", "kind", "metadata", "spec"]);

const cnpg = JSON.parse(readFileSync(join(schemasDir, "postgresql.cnpg.io-v1.json"), "utf8"));
const ajv = new Ajv({ allErrors: true, strict: false });
const cnpgValidators = {};
for (const kind of ["Cluster", "Database"]) {
  cnpgValidators[kind] = ajv.compile({ ...cnpg[kind], $defs: cnpg.$defs });
}

// A copy of `value` whose every object records the fields read from it.
function tracked(value, path, seen) {
  if (value === null || typeof value !== "object") return value;
  const inner = Array.isArray(value)
    ? value.map((v, i) => tracked(v, `${path}/${i}`, seen))
    : Object.fromEntries(Object.entries(value).map(([k, v]) => [k, tracked(v, `${path}/${k}`, seen)]));
  const mark = (k) => { if (typeof k === "string" && Object.hasOwn(inner, k)) seen.add(`${path}/${k}`); };
  return new Proxy(inner, {
    get(t, k, r) { mark(k); return Reflect.get(t, k, r); },
    has(t, k) { mark(k); return Reflect.has(t, k); },
    getOwnPropertyDescriptor(t, k) { mark(k); return Reflect.getOwnPropertyDescriptor(t, k); },
    ownKeys(t) { for (const k of Reflect.ownKeys(t)) mark(k); return Reflect.ownKeys(t); },
  });
}

// Paths of `value` that no schema read, outermost only.
function unread(value, path, seen, out) {
  if (value === null || typeof value !== "object") return;
  for (const [k, v] of Object.entries(value)) {
    const p = `${path}/${k}`;
    if (!seen.has(p)) out.push(p);
    else unread(v, p, seen, out);
  }
}

const problems = [];
let checked = 0;
for (const object of objects) {
  const [group, version] = object.apiVersion.includes("/") ? object.apiVersion.split("/") : ["", object.apiVersion];
  const name = `${object.kind}/${object.metadata?.name}`;
  if (BUILT_IN.test(group)) continue;
  if (group === "postgresql.cnpg.io" && version === "v1" && cnpgValidators[object.kind]) {
    const validate = cnpgValidators[object.kind];
    if (!validate(object)) {
      for (const e of validate.errors) {
        const extra = e.params?.additionalProperty ? ` (${e.params.additionalProperty})` : "";
        problems.push(`${name}: ${e.instancePath || "/"} ${e.message}${extra}`);
      }
    }
    checked++;
    continue;
  }
  const pkg = PACKAGES.find(([re]) => re.test(group))?.[1];
  let Model;
  if (pkg) {
    try {
      Model = (await import(`${pkg}/${group}/${version}/${object.kind}`))[object.kind];
    } catch {
      Model = undefined;
    }
  }
  if (!Model) {
    problems.push(`${name}: no schema for ${object.apiVersion} ${object.kind}`);
    continue;
  }
  for (const k of Object.keys(object)) {
    if (!TOP_LEVEL.has(k)) problems.push(`${name}: unknown field /${k}`);
  }
  // One record per top-level field, so that /spec/name and
  // /metadata/name are told apart.
  const seen = { metadata: new Set(), spec: new Set() };
  const model = new Model(Object.fromEntries([...TOP_LEVEL].filter((k) => k in object).map((k) => [k, object[k]])));
  // The constructor reads every field; the tracking starts after it.
  for (const k of Object.keys(seen)) {
    if (k in object) model[k] = tracked(object[k], "", seen[k]);
  }
  try {
    model.validate();
  } catch (e) {
    problems.push(`${name}: ${e.message}`);
  }
  for (const k of ["metadata", "spec"]) {
    if (!(k in object)) continue;
    const out = [];
    unread(object[k], "", seen[k], out);
    for (const p of out) problems.push(`${name}: unknown field /${k}${p}`);
  }
  checked++;
}

if (problems.length > 0) {
  console.error(problems.join("\n"));
  process.exit(1);
}
console.log(`${checked} custom resources valid`);
