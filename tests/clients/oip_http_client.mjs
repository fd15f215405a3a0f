// An Open Inference Protocol client written from docs/PROTOCOL.md alone, on Node's own
// fetch (undici): no gpu-pool or Triton code. Usage: node oip_http_client.mjs HOST:PORT MODEL
// Prints one JSON object with what it saw; the test compares it to the model's answers.
const [base, model] = [`http://${process.argv[2]}`, process.argv[3]];

async function json(path, init) {
  const r = await fetch(base + path, init);
  return { status: r.status, body: await r.json().catch(() => null) };
}

// The binary tensor extension: a JSON header, then each binary tensor's bytes in order.
function binaryRequest(inputs, outputs) {
  const header = {
    inputs: inputs.map(({ name, shape, data }) => ({
      name, shape, datatype: "FP32", parameters: { binary_data_size: data.byteLength },
    })),
    outputs: outputs.map((name) => ({ name, parameters: { binary_data: true } })),
  };
  const head = Buffer.from(JSON.stringify(header));
  const body = Buffer.concat([head, ...inputs.map(({ data }) => Buffer.from(data.buffer))]);
  return { body, headLength: head.length };
}

function readBinaryAnswer(buf, headLength) {
  const header = JSON.parse(buf.subarray(0, headLength).toString());
  let at = headLength;
  const out = {};
  for (const o of header.outputs) {
    const n = o.parameters.binary_data_size;
    const bytes = buf.subarray(at, at + n);
    at += n;
    out[o.name] = Array.from(new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + n)));
  }
  return { header, out };
}

async function binaryInfer(names, a, b) {
  const inputs = [
    { name: names[0], shape: [2, 4], data: Float32Array.from(a) },
    { name: names[1], shape: [2, 4], data: Float32Array.from(b) },
  ];
  const { body, headLength } = binaryRequest(inputs, ["output0", "output1"]);
  const r = await fetch(`${base}/v2/models/${model}/infer`, {
    method: "POST",
    headers: {
      "Content-Type": "application/octet-stream",
      "Inference-Header-Content-Length": String(headLength),
    },
    body,
  });
  const buf = Buffer.from(await r.arrayBuffer());
  const length = Number(r.headers.get("inference-header-content-length"));
  const { header, out } = readBinaryAnswer(buf, length);
  return { status: r.status, version: header.model_version, out };
}

const ready = await fetch(`${base}/v2/health/ready`);
const meta = await json(`/v2/models/${model}`);
const names = meta.body.inputs.map((i) => i.name);
const a = [1, 2, 3, 4, 5, 6, 7, 8];
const b = [0.5, -1, 2, 0, 10, -3, 0.25, 4];
const binary = await binaryInfer(names, a, b);
const asJson = await json(`/v2/models/${model}/infer`, {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({
    inputs: [
      { name: names[0], shape: [2, 4], datatype: "FP32", data: a },
      { name: names[1], shape: [2, 4], datatype: "FP32", data: b },
    ],
  }),
});
// 32 at once over undici's keep-alive pool: every answer belongs to its own request.
const many = await Promise.all(
  Array.from({ length: 32 }, (_, i) =>
    binaryInfer(names, a.map((x) => x + i), b).then((r) => r.out.output0[0]),
  ),
);
const missing = await json("/v2/models/no-such-model/infer", {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({ inputs: [{ name: "x", shape: [1, 1], datatype: "FP32", data: [1] }] }),
});
console.log(JSON.stringify({
  ready: ready.status, metaStatus: meta.status, names,
  outputs: meta.body.outputs.map((o) => [o.name, o.datatype]),
  binary, json: { status: asJson.status, version: asJson.body.model_version,
    outputs: asJson.body.outputs.map((o) => [o.name, o.datatype, o.shape, o.data]) },
  many, missing,
}));
