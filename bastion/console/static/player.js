// The recording player: asciinema-player (vendored, static/asciinema-player.min.js) with the
// recording's markers on its timeline, a marker list and search hits that seek, and a speed choice.
(function () {
  "use strict";
  var node = document.getElementById("player-config");
  var el = document.getElementById("player");
  if (!node || !el || !window.AsciinemaPlayer) return;
  var config = JSON.parse(node.textContent);
  var player = null;

  function create(speed, startAt, autoPlay) {
    if (player) player.dispose();
    var src = config.stream ? { url: config.stream, driver: "eventsource" } : config.cast;
    player = AsciinemaPlayer.create(src, el, {
      speed: speed, autoPlay: !!autoPlay || !!config.stream, preload: true,
      fit: "width", terminalFontSize: "small", idleTimeLimit: config.stream ? undefined : 2,
      cols: config.cols, rows: config.rows,
    });
    if (startAt > 0 && !config.stream) {
      // Show the screen as it was just after that moment (a search hit): the line is on it.
      player.seek(startAt + 0.01).then(function () { el.dataset.seeked = String(startAt); });
    }
    window.guaritaPlayer = player;  // for people (and tests) poking at it in the console
    return player;
  }

  var unverified = document.getElementById("play-unverified");
  if (config.cast && !config.verified && unverified) {
    // A recording that failed verification is never shown as if it were fine: only on request,
    // framed as unverified (see console.css).
    unverified.addEventListener("click", function () { unverified.disabled = true; create(1, config.start); });
  } else {
    create(1, config.start);
  }

  document.querySelectorAll("button.seek").forEach(function (b) {
    b.addEventListener("click", function () {
      if (!player) return;
      var t = parseFloat(b.dataset.t);
      player.seek(t).then(function () { el.dataset.seeked = String(t); });
    });
  });
  var speed = document.getElementById("speed");
  if (speed) speed.addEventListener("change", function () {
    var at = player ? player.getCurrentTime() : 0;
    create(parseFloat(speed.value), at, true);
  });
})();
