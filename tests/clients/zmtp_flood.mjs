// A hostile ZMTP 3.0 DEALER written from the ZMTP spec and docs/PROTOCOL.md alone (no libzmq):
// it floods [256,16] float32 requests on N connections and never reads a byte back.
// node zmtp_flood.mjs HOST PORT CONNECTIONS MODEL   (prints {"sent": n} every second)
import net from "node:net";
const [host, port, conns, model] = [process.argv[2], +process.argv[3], +process.argv[4], process.argv[5]];
function str(s) { const b = Buffer.from(s); return Buffer.concat([Buffer.from([0xa0 | b.length]), b]); }
function u32(n) { const b = Buffer.alloc(5); b[0] = 0xce; b.writeUInt32BE(n, 1); return b; }
function header(id) {
  return Buffer.concat([Buffer.from([0x84]), str("model"), str(model), str("inputs"),
    Buffer.from([0x91, 0x82]), str("dtype"), str("float32"), str("shape"),
    Buffer.from([0x92, 0xcd, 0x01, 0x00, 0x10]), str("id"), u32(id), str("timeout_ms"), u32(60000)]);
}
function frame(body, more) {
  if (body.length < 256) return Buffer.concat([Buffer.from([more ? 1 : 0, body.length]), body]);
  const h = Buffer.alloc(9); h[0] = (more ? 1 : 0) | 2; h.writeBigUInt64BE(BigInt(body.length), 1);
  return Buffer.concat([h, body]);
}
const greeting = Buffer.alloc(64); greeting[0] = 0xff; greeting[9] = 0x7f; greeting[10] = 3; greeting[11] = 0;
greeting.write("NULL", 12);
const props = Buffer.concat([Buffer.from([11]), Buffer.from("Socket-Type"), Buffer.from([0, 0, 0, 6]), Buffer.from("DEALER")]);
const readyBody = Buffer.concat([Buffer.from([5]), Buffer.from("READY"), props]);
const ready = Buffer.concat([Buffer.from([0x04, readyBody.length]), readyBody]);
const tensor = Buffer.alloc(256 * 16 * 4);
for (let i = 0; i < 256 * 16; i++) tensor.writeFloatLE((i % 97) / 97, i * 4);
let sent = 0;
for (let c = 0; c < conns; c++) {
  const s = net.connect(port, host);
  let id = c * 10000000;
  s.on("connect", () => { s.write(greeting); s.write(ready); s.pause(); // never read
    // Yield to the event loop every 64 messages: a write the kernel takes at once returns
    // true, and a loop that never yields would starve the timer that reports `sent`.
    const pump = () => { for (let i = 0; i < 64; i++) {
      const msg = Buffer.concat([frame(Buffer.alloc(0), true), frame(Buffer.from("gpu-pool/1"), true),
        frame(header(++id), true), frame(tensor, false)]);
      sent++;
      if (!s.write(msg)) { s.once("drain", pump); return; } }
      setImmediate(pump); };
    setTimeout(pump, 50); });
  s.on("error", (e) => { console.error("conn", c, e.message); });
}
setInterval(() => console.log(JSON.stringify({ sent })), 1000);
process.on("SIGTERM", () => { console.log(JSON.stringify({ sent })); process.exit(0); });
