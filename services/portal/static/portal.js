// Charts (Chart.js, vendored) from the JSON the page carries, and the overview's live
// balance from the portal's server-sent events. Every number shown by a chart is also in the
// table under it.
(function () {
  "use strict";
  var data = document.getElementById("chart-data");
  if (data && window.Chart) {
    var charts = JSON.parse(data.textContent);
    var draw = function (id, series, type) {
      var canvas = document.getElementById(id);
      if (!canvas) { return; }
      new window.Chart(canvas, {
        type: type,
        data: { labels: series.labels, datasets: [{ label: "credits", data: series.values,
          backgroundColor: "#0b57d0", borderColor: "#0b57d0" }] },
        options: { animation: false, maintainAspectRatio: false, plugins: { legend: { display: false } },
          scales: { y: { beginAtZero: true } } }
      });
    };
    draw("chart-time", charts.time, "bar");
    draw("chart-groups", charts.groups, "bar");
  }
  var balance = document.getElementById("balance");
  if (balance && balance.getAttribute("data-events") && window.EventSource) {
    var live = document.getElementById("live-state");
    var source = new EventSource(balance.getAttribute("data-events"));
    source.addEventListener("open", function () { live.textContent = "on"; });
    source.addEventListener("error", function () { live.textContent = "reconnecting…"; });
    source.addEventListener("balance", function (event) {
      var b = JSON.parse(event.data);
      document.getElementById("available").textContent = b.available;
      document.getElementById("held").textContent = b.held;
      document.getElementById("arrears").textContent = b.arrears;
      document.getElementById("billing-state").textContent = b.state;
      live.textContent = "on";
      balance.setAttribute("data-updated", String(Date.now()));
    });
  }
})();
