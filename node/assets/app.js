// Edgecard storefront: progressive enhancements only; every page works without this file.
(function () {
  "use strict";

  function selectText(node) {
    var range = document.createRange();
    range.selectNodeContents(node);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  // Copy buttons: <button data-copy="ID" data-copied="label" hidden>.
  Array.prototype.forEach.call(document.querySelectorAll("button[data-copy]"), function (button) {
    var target = document.getElementById(button.getAttribute("data-copy"));
    if (!target) {
      return;
    }
    var label = button.textContent;
    button.hidden = false;
    button.addEventListener("click", function () {
      var done = function () {
        button.textContent = button.getAttribute("data-copied") || label;
        window.setTimeout(function () { button.textContent = label; }, 2000);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(target.textContent).then(done, function () { selectText(target); });
      } else {
        selectText(target);
      }
    });
  });

  // Challenge page: solve the proof of work in a Web Worker, then resubmit the order. Without
  // JavaScript (or a worker) the page's wait-ticket form does the same job, after a delay.
  var pow = document.getElementById("pow-form");
  var note = document.getElementById("pow-progress");
  if (pow && note && window.Worker) {
    var waitForm = document.getElementById("wait-form");
    var fail = function () {
      note.textContent = note.getAttribute("data-failed");
      if (waitForm) {
        waitForm.hidden = false;
      }
    };
    try {
      var worker = new Worker(pow.getAttribute("data-worker"));
      note.hidden = false;
      note.textContent = note.getAttribute("data-working");
      if (waitForm) {
        waitForm.hidden = true;
      }
      worker.onmessage = function (event) {
        var data = event.data || {};
        if (data.solution !== undefined) {
          worker.terminate();
          pow.querySelector("input[name=solution]").value = data.solution;
          note.textContent = note.getAttribute("data-done");
          pow.submit();
        } else if (data.tries !== undefined) {
          note.textContent = note.getAttribute("data-progress").replace("{n}", String(data.tries));
        } else {
          worker.terminate();
          fail();
        }
      };
      worker.onerror = fail;
      worker.postMessage({
        token: pow.querySelector("input[name=challenge]").value,
        difficulty: parseInt(pow.getAttribute("data-difficulty"), 10)
      });
    } catch (e) {
      fail();
    }
  }

  // Order page: poll the order until its status changes, then reload to show it.
  var order = document.querySelector("[data-poll-order]");
  if (!order) {
    return;
  }
  var id = order.getAttribute("data-poll-order");
  var status = order.getAttribute("data-poll-status");
  var every = parseInt(order.getAttribute("data-poll-ms"), 10) || 3000;
  var token = new URLSearchParams(window.location.search).get("token");
  var stopAt = Date.now() + 60 * 60 * 1000;
  if (!/^[0-9a-f]{32}$/.test(id)) {
    return;
  }
  if (!token) {
    // A return link from a payment provider carries no order token: reload the page instead.
    window.setTimeout(function () { window.location.reload(); }, Math.max(every, 10000));
    return;
  }
  function tick() {
    if (Date.now() > stopAt) {
      return;
    }
    fetch("/api/v1/orders/" + id, {
      headers: { "Authorization": "Bearer " + token },
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer"
    }).then(function (response) {
      return response.ok ? response.json() : null;
    }).then(function (body) {
      if (body && body.status && body.status !== status) {
        window.location.reload();
      } else {
        window.setTimeout(tick, every);
      }
    }, function () {
      window.setTimeout(tick, every * 2);
    });
  }
  window.setTimeout(tick, every);
})();
