// Re-reads the worklist rows every few seconds without reloading the page, so the filters
// (the page's own query string) and the scroll position stay as the radiologist left them.
// Rows that were not on the list before are briefly highlighted; urgent ones carry "NEW".
(function () {
  "use strict";
  const body = document.getElementById("rows");
  const total = document.getElementById("total");
  const state = document.getElementById("refresh-state");
  if (!body || !state) return;
  const interval = Math.max(1, Number(state.dataset.interval || 5)) * 1000;
  const uids = () => new Set(Array.from(body.querySelectorAll("tr[data-uid]"), (tr) => tr.dataset.uid));
  let known = uids();

  async function refresh() {
    try {
      const response = await fetch("/worklist/rows" + window.location.search, {
        credentials: "same-origin",
        headers: { "Accept": "text/html" },
      });
      if (response.redirected || response.status === 401) { window.location.reload(); return; }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const html = await response.text();
      body.innerHTML = html;
      const now = uids();
      body.querySelectorAll("tr[data-uid]").forEach((tr) => {
        if (!known.has(tr.dataset.uid)) tr.classList.add("arrived");
      });
      known = now;
      if (total && response.headers.get("X-Total") !== null) total.textContent = response.headers.get("X-Total-Label");
      state.textContent = "updated " + new Date().toLocaleTimeString();
      state.classList.remove("error");
    } catch (err) {
      state.textContent = "could not refresh (" + err.message + "); retrying";
      state.classList.add("error");
    }
  }
  window.setInterval(refresh, interval);
})();
