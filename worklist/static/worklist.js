// Re-reads the worklist rows every few seconds without reloading the page, so the filters
// (the page's own query string) and the scroll position stay as the radiologist left them.
// Rows that were not on the list before are briefly highlighted; urgent ones carry "NEW".
// Keyboard: j / ArrowDown next study, k / ArrowUp previous, Enter opens it, m marks it read,
// u unread. The list's order is kept for the study page, whose "next study" follows it.
(function () {
  "use strict";
  const body = document.getElementById("rows");
  const total = document.getElementById("total");
  const state = document.getElementById("refresh-state");
  if (!body || !state) return;
  const interval = Math.max(1, Number(state.dataset.interval || 5)) * 1000;
  const rowsOf = () => Array.from(body.querySelectorAll("tr[data-uid]"));
  const uids = () => new Set(rowsOf().map((tr) => tr.dataset.uid));
  let known = uids();
  let selected = null; // the selected study's UID, kept across refreshes

  function remember() {
    // What "next study" means on a study page: this list, in this order, with these filters.
    try {
      window.sessionStorage.setItem("worklist.order", JSON.stringify(rowsOf().map((tr) => tr.dataset.uid)));
      window.sessionStorage.setItem("worklist.url", window.location.pathname + window.location.search);
    } catch (err) { /* storage disabled: the study page then offers only "back to the worklist" */ }
  }

  function select(tr) {
    rowsOf().forEach((r) => r.classList.toggle("selected", r === tr));
    selected = tr ? tr.dataset.uid : null;
    if (tr) tr.scrollIntoView({ block: "nearest" });
  }

  function current() {
    return rowsOf().find((tr) => tr.dataset.uid === selected) || null;
  }

  function move(step) {
    const all = rowsOf();
    if (!all.length) return;
    const at = all.indexOf(current());
    const next = at < 0 ? (step > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, at + step));
    select(all[next]);
  }

  async function setRead(tr, value) {
    const response = await window.setReadState(tr.dataset.uid, value);
    if (!response.ok) {
      state.textContent = "could not mark the study " + value + " (HTTP " + response.status + ")";
      state.classList.add("error");
      return;
    }
    await refresh();
  }

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
        if (tr.dataset.uid === selected) tr.classList.add("selected");
      });
      known = now;
      remember();
      if (total && response.headers.get("X-Total") !== null) total.textContent = response.headers.get("X-Total-Label");
      state.textContent = "updated " + new Date().toLocaleTimeString();
      state.classList.remove("error");
    } catch (err) {
      state.textContent = "could not refresh (" + err.message + "); retrying";
      state.classList.add("error");
    }
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target && (target.isContentEditable || ["INPUT", "SELECT", "TEXTAREA"].includes(target.tagName))) return;
    // A focused button or link keeps Enter and space for itself; letters still reach the page.
    if (target && ["BUTTON", "A"].includes(target.tagName) && (event.key === "Enter" || event.key === " ")) return;
    const tr = current();
    if (event.key === "j" || event.key === "ArrowDown") { move(1); event.preventDefault(); }
    else if (event.key === "k" || event.key === "ArrowUp") { move(-1); event.preventDefault(); }
    else if (event.key === "Enter" && tr) { window.location.href = tr.querySelector("a.open").href; }
    else if (event.key === "m" && tr) { setRead(tr, "read"); }
    else if (event.key === "u" && tr) { setRead(tr, "unread"); }
  });
  body.addEventListener("click", (event) => {
    const tr = event.target.closest("tr[data-uid]");
    if (tr && !event.target.closest("a")) select(tr);
  });
  const order = document.getElementById("order");
  if (order && order.form) order.addEventListener("change", () => order.form.submit());

  remember();
  window.setInterval(refresh, interval);
})();
