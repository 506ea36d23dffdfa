// Edgecard proof-of-work solver (docs/abuse.md), run in a Web Worker by the challenge page.
// Finds the first counter n such that SHA-256(token + ":" + n) starts with `difficulty` zero bits.
// Messages out: {tries} now and then, {solution} at the end, {error} if the browser cannot hash.
"use strict";

var BATCH = 256;
var MAX_TRIES = 1 << 30;

function zeroBits(bytes) {
  var bits = 0;
  for (var i = 0; i < bytes.length; i++) {
    if (bytes[i] === 0) {
      bits += 8;
      continue;
    }
    return bits + Math.clz32(bytes[i]) - 24;
  }
  return bits;
}

self.onmessage = function (event) {
  var token = String(event.data.token);
  var difficulty = event.data.difficulty | 0;
  var encoder = new TextEncoder();
  if (!self.crypto || !self.crypto.subtle) {
    self.postMessage({ error: "no-subtle-crypto" });
    return;
  }
  var next = 0;
  var lastReport = 0;
  function batch() {
    var start = next;
    var digests = [];
    for (var k = 0; k < BATCH; k++) {
      digests.push(self.crypto.subtle.digest("SHA-256", encoder.encode(token + ":" + (start + k))));
    }
    next += BATCH;
    return Promise.all(digests).then(function (hashes) {
      for (var k = 0; k < hashes.length; k++) {
        if (zeroBits(new Uint8Array(hashes[k])) >= difficulty) {
          self.postMessage({ solution: String(start + k) });
          return;
        }
      }
      if (next - lastReport >= 8192) {
        lastReport = next;
        self.postMessage({ tries: next });
      }
      if (next >= MAX_TRIES) {
        self.postMessage({ error: "gave-up" });
        return;
      }
      return batch();
    });
  }
  batch().catch(function () {
    self.postMessage({ error: "hash-failed" });
  });
};
