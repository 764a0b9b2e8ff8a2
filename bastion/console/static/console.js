// guarita console: refresh the #live part of a page when the server says it changed (server-sent
// events, across replicas), keep relative times counting. No framework; the server renders HTML.
(function () {
  "use strict";
  function relative(ts, until) {
    var d = Math.abs(Date.now() / 1000 - ts), t;
    if (d < 60) t = Math.round(d) + "s"; else if (d < 3600) t = Math.round(d / 60) + "m";
    else if (d < 86400) t = (d / 3600).toFixed(1) + "h"; else t = (d / 86400).toFixed(1) + "d";
    if (until) return ts > Date.now() / 1000 ? "in " + t : t + " ago";
    return t + " ago";
  }
  function tick() {
    document.querySelectorAll("[data-age]").forEach(function (el) { el.textContent = relative(+el.dataset.age, false); });
    document.querySelectorAll("[data-until]").forEach(function (el) { el.textContent = relative(+el.dataset.until, true); });
  }
  setInterval(tick, 1000);

  var topic = document.body.dataset.live;
  var live = document.getElementById("live");
  if (!topic || !live || !window.EventSource) return;
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    var url = location.pathname + (location.search ? location.search + "&" : "?") + "fragment=1";
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } }).then(function (r) {
      if (r.status === 401 || r.redirected) { location.reload(); return null; }
      var digest = r.headers.get("Guarita-Digest");
      if (!r.ok || (digest && digest === live.dataset.digest)) return null;  // nothing new: keep the DOM
      live.dataset.digest = digest || "";
      return r.text();
    }).then(function (html) {
      if (html === null) return;
      // Keep what the person is typing (reasons) across the refresh.
      var typed = {}, focused = document.activeElement && document.activeElement.id;
      live.querySelectorAll("input[id]").forEach(function (i) { if (i.value) typed[i.id] = i.value; });
      live.innerHTML = html;
      Object.keys(typed).forEach(function (id) { var i = document.getElementById(id); if (i) i.value = typed[id]; });
      if (focused) { var f = document.getElementById(focused); if (f) f.focus(); }
      document.body.dataset.refreshed = String(Date.now());
      tick();
    }).catch(function () {}).then(function () {
      busy = false;
      if (again) { again = false; refresh(); }
    });
  }
  var source = new EventSource("/console/events");
  source.addEventListener("hello", refresh);  // whatever changed between the page and the stream
  source.addEventListener(topic, refresh);
  source.addEventListener("expired", function () { source.close(); location.reload(); });
  // The sessions page also shows byte counts, which change without an event.
  if (topic === "sessions") setInterval(refresh, 5000);
})();
