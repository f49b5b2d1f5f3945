// analyticsd web dashboard. Plain JavaScript, no build step. It calls the public read API with the
// credential the user signed in with (kept in sessionStorage, sent only to this origin) and makes one
// request per widget: event names (pickers), usage (KPI cards), usage (chart), quotas, events (table).
// Every value from the API is written with textContent, never as HTML.
(function () {
  'use strict';

  var API = '/api/analytics';
  var SESSION_KEY = 'analyticsd.dashboard.session';
  var KPI_METRICS = ['auth.user.registered', 'auth.user.login', 'builder.generate.completed', 'apikey.request'];
  var PAGE_SIZE = 25;
  var MAX_CHART_METRICS = 8;
  var MAX_RANGE_DAYS = 366;
  var DAY_MS = 86400000;
  var PALETTE = ['#4f46e5', '#0891b2', '#16a34a', '#d97706', '#db2777', '#7c3aed', '#0d9488', '#64748b'];
  var QUOTA_LABELS = {
    api_requests_daily: 'API requests',
    builds_daily: 'Builds',
    emails_daily: 'Emails',
    webhooks_daily: 'Webhooks',
    storage_gb: 'Storage (GB)'
  };
  var numberFmt = new Intl.NumberFormat('en-US');

  var $ = function (sel, root) { return (root || document).querySelector(sel); };
  var $$ = function (sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); };

  var state = {
    session: null,          // {token, tenant}
    range: { days: 30 },    // {days: N} or {from: 'YYYY-MM-DD', to: 'YYYY-MM-DD'}
    zone: 'UTC',            // the tenant's time zone, from X-Analytics-Time-Zone: days start at its midnight
    names: [],              // [{event, count}] for the range
    chartMetrics: KPI_METRICS.slice(),
    filters: { event: '', source: '' },
    cursors: [''],          // cursors[i] fetches page i; '' is the first page
    page: 0,
    nextCursor: null,
    chart: null,
    inflight: {}            // widget → AbortController of its current request
  };

  // ---------------------------------------------------------------- API

  function ApiError(status, code, message) {
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.message = message;
  }
  ApiError.prototype = Object.create(Error.prototype);

  function query(params) {
    var qs = new URLSearchParams();
    Object.keys(params || {}).forEach(function (k) {
      var v = params[k];
      if (Array.isArray(v)) {
        v.forEach(function (x) { qs.append(k, x); });
      } else if (v !== undefined && v !== null && v !== '') {
        qs.append(k, v);
      }
    });
    var s = qs.toString();
    return s ? '?' + s : '';
  }

  function headers(session) {
    var h = { Authorization: 'Bearer ' + session.token, Accept: 'application/json' };
    if (session.tenant) h['X-Tenant-Slug'] = session.tenant;
    return h;
  }

  // errorFrom reads the {"success":false,"error":{code,message}} envelope of a failed response.
  function errorFrom(res) {
    return res.text().then(function (text) {
      var code = 'http_' + res.status, message = '';
      try {
        var body = JSON.parse(text);
        if (body && body.error) {
          code = body.error.code || code;
          message = body.error.message || '';
        }
      } catch (e) { /* not JSON: fall through */ }
      if (!message) message = 'the server answered ' + res.status + (res.statusText ? ' ' + res.statusText : '');
      return new ApiError(res.status, code, message);
    });
  }

  // request fetches path for widget (cancelling that widget's previous request) and resolves to the
  // Response; failures reject with ApiError.
  function request(widget, path, params, session) {
    session = session || state.session;
    if (state.inflight[widget]) state.inflight[widget].abort();
    var ctrl = new AbortController();
    state.inflight[widget] = ctrl;
    return fetch(API + path + query(params), { headers: headers(session), signal: ctrl.signal, credentials: 'omit', cache: 'no-store' })
      .catch(function (err) {
        if (err && err.name === 'AbortError') throw err;
        throw new ApiError(0, 'network', 'could not reach the server; check your connection and retry');
      })
      .then(function (res) {
        if (state.inflight[widget] === ctrl) delete state.inflight[widget];
        if (!res.ok) return errorFrom(res).then(function (e) { throw e; });
        setZone(res.headers.get('X-Analytics-Time-Zone'));
        return res;
      });
  }

  function getData(widget, path, params, session) {
    return request(widget, path, params, session).then(function (res) { return res.json(); }).then(function (body) {
      if (!body || body.success !== true) throw new ApiError(200, 'bad_response', 'unexpected response from the server');
      return body.data;
    });
  }

  // ---------------------------------------------------------------- dates

  function utcToday() {
    var now = new Date();
    return new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate()));
  }
  // Dates travel as YYYY-MM-DD and the server reads them as days of the tenant's zone, so "today"
  // is the date in that zone (a Date at that date's UTC midnight, like every date here).
  function zoneToday() {
    try {
      var d = parseYMD(new Intl.DateTimeFormat('en-CA', { timeZone: state.zone, year: 'numeric', month: '2-digit', day: '2-digit' }).format(new Date()));
      if (d) return d;
    } catch (e) { /* a zone this browser does not know: UTC */ }
    return utcToday();
  }
  // setZone takes the zone the server answered in; the labels that name it follow.
  function setZone(zone) {
    if (!zone || zone === state.zone) return;
    try { new Intl.DateTimeFormat('en-GB', { timeZone: zone }); } catch (e) { return; }
    state.zone = zone;
    $('#zone-name').textContent = zone;
    $('#ts-zone').textContent = zone;
    $('#range-label').textContent = rangeLabel();
  }
  // zoneTime shows an RFC3339 UTC time in the tenant's zone: "2026-11-30 19:45:00".
  function zoneTime(ts) {
    var d = new Date(ts);
    if (isNaN(d.getTime())) return String(ts || '');
    try {
      return new Intl.DateTimeFormat('sv-SE', { timeZone: state.zone, year: 'numeric', month: '2-digit', day: '2-digit',
        hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false }).format(d);
    } catch (e) { return String(ts).replace('T', ' ').replace('Z', ''); }
  }
  function ymd(d) { return d.toISOString().slice(0, 10); }
  function parseYMD(s) {
    if (!/^\d{4}-\d{2}-\d{2}$/.test(s)) return null;
    var d = new Date(s + 'T00:00:00Z');
    return isNaN(d.getTime()) ? null : d;
  }
  // rangeDates returns the inclusive days (in the tenant's zone) of the selected range.
  function rangeDates() {
    if (state.range.days) {
      var to = zoneToday();
      return { from: new Date(to.getTime() - (state.range.days - 1) * DAY_MS), to: to };
    }
    return { from: parseYMD(state.range.from), to: parseYMD(state.range.to) };
  }
  function rangeParams() {
    var r = rangeDates();
    return { from: ymd(r.from), to: ymd(r.to) };
  }
  var dayFmt = new Intl.DateTimeFormat('en-GB', { day: 'numeric', month: 'short', timeZone: 'UTC' });
  var monthFmt = new Intl.DateTimeFormat('en-GB', { day: 'numeric', month: 'short', year: 'numeric', timeZone: 'UTC' });
  function rangeLabel() {
    var r = rangeDates();
    var days = Math.round((r.to - r.from) / DAY_MS) + 1;
    return monthFmt.format(r.from) + ' – ' + monthFmt.format(r.to) + ' · ' + days + (days === 1 ? ' day' : ' days') + ' (' + state.zone + ')';
  }

  // ---------------------------------------------------------------- widget state helpers

  function setState(el, s) { el.setAttribute('data-state', s); }

  function showError(el, err) {
    var box = $('.widget-error', el);
    if (box) {
      box.textContent = messageFor(err);
      box.hidden = false;
    }
    var empty = $('.widget-empty', el);
    if (empty) empty.hidden = true;
    setState(el, 'error');
  }

  function clearError(el) {
    var box = $('.widget-error', el);
    if (box) box.hidden = true;
  }

  function messageFor(err) {
    if (!(err instanceof ApiError)) return 'Something went wrong: ' + (err && err.message ? err.message : String(err));
    if (err.status === 0) return 'Could not reach the server. Check your connection and refresh.';
    if (err.status === 403) return 'Not allowed: ' + err.message;
    if (err.status === 404) return 'Not available on this server.';
    if (err.status === 503) return sentence(err.message) + ' Use ↻ to try again.';
    return sentence(err.message);
  }

  function capitalize(s) { return s ? s.charAt(0).toUpperCase() + s.slice(1) : s; }
  function sentence(s) {
    s = capitalize(String(s || '').trim());
    return /[.!?]$/.test(s) ? s : s + '.';
  }

  // handleFailure routes an error: aborted requests are ignored, an expired or revoked credential
  // ends the session, anything else is shown on the widget.
  function handleFailure(el, err) {
    if (err && err.name === 'AbortError') return;
    if (err instanceof ApiError && err.status === 401) {
      signOut('Your session has ended: ' + err.message + '. Sign in again.');
      return;
    }
    showError(el, err);
  }

  // ---------------------------------------------------------------- sign-in

  function loadSession() {
    try {
      var s = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
      if (s && typeof s.token === 'string' && s.token && typeof s.tenant === 'string') return s;
    } catch (e) { /* ignore a corrupt entry */ }
    return null;
  }

  function showSignin(message) {
    $('#app').hidden = true;
    $('#signin').hidden = false;
    var box = $('#signin-error');
    box.textContent = message || '';
    box.hidden = !message;
    document.title = 'Sign in · analyticsd';
    ($('#signin-tenant').value ? $('#signin-token') : $('#signin-tenant')).focus();
  }

  function signOut(message) {
    Object.keys(state.inflight).forEach(function (k) { state.inflight[k].abort(); });
    state.inflight = {};
    state.session = null;
    sessionStorage.removeItem(SESSION_KEY);
    resetView();
    $('#signin-token').value = '';
    showSignin(message);
  }

  // resetView forgets everything the previous session showed, so the next tenant starts clean.
  function resetView() {
    destroyChart();
    state.names = [];
    state.chartMetrics = KPI_METRICS.slice();
    state.filters = { event: '', source: '' };
    resetPages();
    $('#filter-event').value = '';
    $('#filter-source').value = '';
    $('#metric-options').textContent = '';
    $('#events-body').textContent = '';
    $('#quota-list').textContent = '';
    $('#export-status').hidden = true;
    $$('.kpi-value').forEach(function (v) { v.textContent = '–'; v.setAttribute('data-value', ''); });
    $$('.widget-error, .widget-empty').forEach(function (e) { e.hidden = true; });
    ['#kpis', '#chart-card', '#quotas', '#events-card'].forEach(function (sel) { setState($(sel), 'loading'); });
  }

  function onSignin(ev) {
    ev.preventDefault();
    var token = $('#signin-token').value.trim().replace(/^Bearer\s+/i, '');
    var tenant = $('#signin-tenant').value.trim();
    var box = $('#signin-error');
    if (!token || !tenant) {
      box.textContent = !token ? 'Paste an API key or token.' : 'Enter your tenant slug.';
      box.hidden = false;
      return;
    }
    var button = $('#signin-submit');
    button.disabled = true;
    button.textContent = 'Signing in…';
    box.hidden = true;
    var session = { token: token, tenant: tenant };
    // The event-name list doubles as the credential check: the pickers need it anyway.
    getData('names', '/event-names', rangeParams(), session).then(function (names) {
      state.session = session;
      sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
      $('#signin-token').value = '';
      showApp();
      renderNames(names);
      loadWidgets();
    }, function (err) {
      if (err && err.name === 'AbortError') return;
      var msg;
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
        msg = (err.status === 401 ? 'Sign-in failed: ' : 'Access denied: ') + err.message + '.';
      } else {
        msg = messageFor(err);
      }
      box.textContent = msg.replace(/\.\.$/, '.');
      box.hidden = false;
    }).then(function () {
      button.disabled = false;
      button.textContent = 'Sign in';
    });
  }

  function showApp() {
    $('#signin').hidden = true;
    $('#app').hidden = false;
    $('#tenant-name').textContent = state.session.tenant;
    document.title = 'Analytics · ' + state.session.tenant + ' · analyticsd';
    renderRange();
  }

  // ---------------------------------------------------------------- range

  function renderRange() {
    $$('.segmented button').forEach(function (b) {
      var v = b.getAttribute('data-range');
      var on = state.range.days ? v === String(state.range.days) : v === 'custom';
      b.setAttribute('aria-pressed', on ? 'true' : 'false');
    });
    $('#custom-range').hidden = !!state.range.days && !customOpen;
    $('#range-label').textContent = rangeLabel();
  }

  var customOpen = false;

  function onRangeClick(ev) {
    var b = ev.target.closest('button[data-range]');
    if (!b) return;
    var v = b.getAttribute('data-range');
    $('#range-error').hidden = true;
    if (v === 'custom') {
      customOpen = true;
      var r = rangeDates();
      $('#custom-from').value = ymd(r.from);
      $('#custom-to').value = ymd(r.to);
      $('#custom-to').max = ymd(utcToday());
      $('#custom-range').hidden = false;
      $$('.segmented button').forEach(function (x) { x.setAttribute('aria-pressed', x === b ? 'true' : 'false'); });
      $('#custom-from').focus();
      return;
    }
    customOpen = false;
    state.range = { days: parseInt(v, 10) };
    onRangeChanged();
  }

  function onCustomRange(ev) {
    ev.preventDefault();
    var from = parseYMD($('#custom-from').value), to = parseYMD($('#custom-to').value);
    var box = $('#range-error');
    var problem = '';
    if (!from || !to) problem = 'Pick both a start and an end date.';
    else if (from > to) problem = 'The start date must be on or before the end date.';
    else if ((to - from) / DAY_MS + 1 > MAX_RANGE_DAYS) problem = 'Pick at most ' + MAX_RANGE_DAYS + ' days.';
    if (problem) {
      box.textContent = problem;
      box.hidden = false;
      return;
    }
    box.hidden = true;
    state.range = { from: ymd(from), to: ymd(to) };
    onRangeChanged();
  }

  function onRangeChanged() {
    renderRange();
    loadNames();
    loadWidgets();
  }

  // ---------------------------------------------------------------- event names (pickers)

  function loadNames() {
    getData('names', '/event-names', rangeParams()).then(renderNames, function (err) {
      if (err && err.name === 'AbortError') return;
      if (err instanceof ApiError && err.status === 401) handleFailure($('#chart-card'), err);
      // The pickers keep their previous entries; the chart and table report their own errors.
    });
  }

  function renderNames(names) {
    state.names = Array.isArray(names) ? names : [];
    // Metric picker: every event in the range plus whatever is selected already.
    var list = $('#metric-options');
    list.textContent = '';
    var seen = {};
    var entries = [];
    state.names.forEach(function (n) { seen[n.event] = true; entries.push(n); });
    state.chartMetrics.forEach(function (m) { if (!seen[m]) entries.push({ event: m, count: 0 }); });
    entries.forEach(function (n) {
      var li = document.createElement('li');
      var label = document.createElement('label');
      var box = document.createElement('input');
      box.type = 'checkbox';
      box.value = n.event;
      box.checked = state.chartMetrics.indexOf(n.event) >= 0;
      var name = document.createElement('span');
      name.textContent = n.event;
      var count = document.createElement('span');
      count.className = 'count';
      count.textContent = numberFmt.format(n.count || 0);
      label.appendChild(box);
      label.appendChild(name);
      label.appendChild(count);
      li.appendChild(label);
      list.appendChild(li);
    });
    $('.picker-empty').hidden = entries.length > 0;
    updatePickerLabel();

    // Event filter: keep the current choice even if it has no events in the new range.
    var sel = $('#filter-event');
    var current = state.filters.event;
    while (sel.options.length > 1) sel.remove(1);
    var names2 = state.names.map(function (n) { return n.event; }).sort();
    if (current && names2.indexOf(current) < 0) names2.unshift(current);
    names2.forEach(function (e) {
      var o = document.createElement('option');
      o.value = e;
      o.textContent = e;
      sel.appendChild(o);
    });
    sel.value = current;
  }

  function updatePickerLabel() {
    var n = state.chartMetrics.length;
    $('#metric-picker-label').textContent = n === 0 ? 'Choose metrics' : n === 1 ? state.chartMetrics[0] : n + ' metrics';
  }

  function onMetricToggle(ev) {
    var box = ev.target;
    if (box.type !== 'checkbox') return;
    var i = state.chartMetrics.indexOf(box.value);
    if (box.checked && i < 0) {
      if (state.chartMetrics.length >= MAX_CHART_METRICS) {
        box.checked = false;
        return;
      }
      state.chartMetrics.push(box.value);
    } else if (!box.checked && i >= 0) {
      state.chartMetrics.splice(i, 1);
    }
    updatePickerLabel();
    loadChart();
  }

  // ---------------------------------------------------------------- KPI cards

  function loadKPIs() {
    var el = $('#kpis');
    setState(el, 'loading');
    clearError(el);
    var params = rangeParams();
    params['metric[]'] = KPI_METRICS;
    var users = rangeParams();
    users.event = 'auth.user.login';
    Promise.all([getData('kpis', '/usage', params), getData('kpis-users', '/active-users', users)]).then(function (res) {
      var series = res[0];
      KPI_METRICS.forEach(function (m) {
        // Active users are distinct people who logged in, not the number of logins.
        var total = m === 'auth.user.login' ? Number(res[1] && res[1].users) || 0 : sum(series && series[m]);
        var card = $('.kpi[data-metric="' + m + '"]', el);
        var v = $('.kpi-value', card);
        v.textContent = numberFmt.format(total);
        v.setAttribute('data-value', String(total));
      });
      setState(el, 'ready');
    }, function (err) {
      $$('.kpi-value', el).forEach(function (v) { v.textContent = '–'; v.setAttribute('data-value', ''); });
      handleFailure(el, err);
    });
  }

  function sum(points) {
    var t = 0;
    (points || []).forEach(function (p) { t += Number(p.count) || 0; });
    return t;
  }

  // ---------------------------------------------------------------- chart

  function destroyChart() {
    if (state.chart) {
      state.chart.destroy();
      state.chart = null;
    }
    var box = $('#chart');
    box.textContent = '';
    box.setAttribute('data-points', '0');
    box.setAttribute('data-total', '0');
  }

  function loadChart() {
    var el = $('#chart-card');
    clearError(el);
    $('.widget-empty', el).hidden = true;
    var metrics = state.chartMetrics.slice();
    if (metrics.length === 0) {
      destroyChart();
      var empty = $('.widget-empty', el);
      empty.textContent = 'Choose one or more metrics to chart.';
      empty.hidden = false;
      setState(el, 'empty');
      return;
    }
    setState(el, 'loading');
    var params = rangeParams();
    params['metric[]'] = metrics;
    params.fill = 'zero';
    getData('chart', '/usage', params).then(function (series) {
      renderChart(metrics, series || {});
    }, function (err) {
      destroyChart();
      handleFailure(el, err);
    });
  }

  function renderChart(metrics, series) {
    var el = $('#chart-card');
    var r = rangeDates();
    var xs = [];
    var index = {};
    for (var t = r.from.getTime(); t <= r.to.getTime(); t += DAY_MS) {
      index[ymd(new Date(t))] = xs.length;
      xs.push(t / 1000);
    }
    var data = [xs];
    var total = 0;
    var totals = [0];
    metrics.forEach(function (m) {
      var ys = xs.map(function () { return 0; });
      var t = 0;
      (series[m] || []).forEach(function (p) {
        var i = index[p.date];
        if (i !== undefined) {
          ys[i] = Number(p.count) || 0;
          t += ys[i];
        }
      });
      totals.push(t);
      total += t;
      data.push(ys);
    });
    destroyChart();
    var empty = $('.widget-empty', el);
    if (total === 0) {
      empty.textContent = 'No data for the selected metrics in this range.';
      empty.hidden = false;
      setState(el, 'empty');
      return;
    }
    empty.hidden = true;
    var box = $('#chart');
    var showPoints = xs.length <= 45;
    var opts = {
      width: Math.max(box.clientWidth, 280),
      height: box.clientWidth < 500 ? 220 : 280,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), 'Etc/UTC'); },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } },
      cursor: { points: { size: 7 } },
      legend: { live: true },
      axes: [
        {
          stroke: '#667085', grid: { stroke: '#eef0f5', width: 1 }, ticks: { stroke: '#e3e6ee', width: 1 },
          // Points are whole UTC days: ticks fall on days (uPlot's defaults put "12am / 12pm" between
          // the points of a 7-day range), labelled like "23 Nov"; the box keeps the labels drawn.
          incrs: [86400, 2 * 86400, 7 * 86400, 14 * 86400, 30 * 86400, 91 * 86400, 365 * 86400],
          values: function (u, splits) {
            var labels = splits.map(function (v) { return dayFmt.format(new Date(v * 1000)); });
            box.setAttribute('data-x-labels', labels.join('|'));
            return labels;
          }
        },
        {
          stroke: '#667085', grid: { stroke: '#eef0f5', width: 1 }, ticks: { show: false }, size: 56,
          values: function (u, splits) { return splits.map(function (v) { return compact(v); }); }
        }
      ],
      // Without a hovered day the legend shows each metric's total over the range.
      series: [{ label: 'Date', value: function (u, v) { return v == null ? 'whole range' : ymd(new Date(v * 1000)); } }].concat(metrics.map(function (m, i) {
        return {
          label: m,
          stroke: PALETTE[i % PALETTE.length],
          width: 2,
          points: { show: showPoints, size: 5 },
          value: function (u, v, si) { return numberFmt.format(v == null ? totals[si] : v); }
        };
      }))
    };
    state.chart = new uPlot(opts, data, box);
    box.setAttribute('data-points', String(xs.length * metrics.length));
    box.setAttribute('data-total', String(total));
    setState(el, 'ready');
  }

  function compact(v) {
    if (v >= 1e9) return trim(v / 1e9) + 'B';
    if (v >= 1e6) return trim(v / 1e6) + 'M';
    if (v >= 1e4) return trim(v / 1e3) + 'k';
    return numberFmt.format(v);
  }
  function trim(x) { return (Math.round(x * 10) / 10).toString(); }

  var resizeTimer = 0;
  function onResize() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      if (!state.chart) return;
      var box = $('#chart');
      state.chart.setSize({ width: Math.max(box.clientWidth, 280), height: box.clientWidth < 500 ? 220 : 280 });
    }, 100);
  }

  // ---------------------------------------------------------------- quotas

  function loadQuotas() {
    var el = $('#quotas');
    setState(el, 'loading');
    clearError(el);
    getData('quotas', '/quotas', {}).then(function (data) {
      renderQuotas(data || {});
    }, function (err) {
      $('#quota-list').textContent = '';
      if (err instanceof ApiError && err.status === 404) {
        var empty = $('.widget-empty', el);
        empty.textContent = 'Quotas are not available on this server.';
        empty.hidden = false;
        setState(el, 'empty');
        return;
      }
      handleFailure(el, err);
    });
  }

  function renderQuotas(data) {
    var el = $('#quotas');
    var list = $('#quota-list');
    list.textContent = '';
    var names = Object.keys(data).filter(function (k) {
      var q = data[k];
      return q && typeof q === 'object' && typeof q.current === 'number';
    }).sort();
    var empty = $('.widget-empty', el);
    empty.textContent = 'No quotas apply to this tenant.';
    empty.hidden = names.length > 0;
    names.forEach(function (name) {
      var q = data[name];
      var limit = typeof q.limit === 'number' ? q.limit : 0;
      var ratio = limit > 0 ? q.current / limit : 0;
      var level = q.disabled ? 'ok' : (q.exceeded || (limit > 0 && ratio >= 1)) ? 'over' : ratio >= 0.8 ? 'warn' : 'ok';
      var li = document.createElement('li');
      li.className = 'quota-row';
      li.setAttribute('data-metric', name);
      li.setAttribute('data-level', level);
      var top = document.createElement('div');
      top.className = 'quota-top';
      var label = document.createElement('span');
      label.className = 'quota-name';
      label.textContent = QUOTA_LABELS[name] || name;
      label.title = name;
      if (level !== 'ok') {
        var tag = document.createElement('span');
        tag.className = 'quota-tag';
        tag.textContent = level === 'over' ? 'Exceeded' : 'Near limit';
        label.appendChild(tag);
      }
      var num = document.createElement('span');
      num.className = 'quota-num';
      num.textContent = limit > 0
        ? numberFmt.format(q.current) + ' / ' + numberFmt.format(limit) + ' · ' + Math.floor(ratio * 100) + '%'
        : numberFmt.format(q.current) + ' · no limit';
      top.appendChild(label);
      top.appendChild(num);
      var bar = document.createElement('div');
      bar.className = 'quota-bar';
      bar.setAttribute('role', 'progressbar');
      bar.setAttribute('aria-label', (QUOTA_LABELS[name] || name) + ' quota');
      bar.setAttribute('aria-valuemin', '0');
      bar.setAttribute('aria-valuemax', String(limit));
      bar.setAttribute('aria-valuenow', String(q.current));
      var fill = document.createElement('div');
      fill.className = 'quota-fill';
      fill.style.width = (limit > 0 ? Math.min(100, ratio * 100) : 0).toFixed(1) + '%';
      bar.appendChild(fill);
      li.appendChild(top);
      li.appendChild(bar);
      list.appendChild(li);
    });
    var foot = $('.card-foot', el);
    var disabled = names.some(function (n) { return data[n].disabled; });
    var degraded = names.some(function (n) { return data[n].degraded; });
    foot.textContent = disabled
      ? 'Quotas are switched off on this server: usage is shown, nothing is refused.'
      : 'Daily quotas reset at 00:00 UTC. Amber from 80%, red at the limit.' +
        (degraded ? ' Live counters are unavailable; today\'s usage was counted from stored events.' : '');
    setState(el, names.length ? 'ready' : 'empty');
  }

  // ---------------------------------------------------------------- events table

  function tableParams() {
    var p = rangeParams();
    p.event = state.filters.event;
    p.source = state.filters.source;
    return p;
  }

  function resetPages() {
    state.cursors = [''];
    state.page = 0;
    state.nextCursor = null;
  }

  function loadEvents() {
    var el = $('#events-card');
    setState(el, 'loading');
    clearError(el);
    $('#page-prev').disabled = true;
    $('#page-next').disabled = true;
    var params = tableParams();
    params.limit = PAGE_SIZE;
    params.cursor = state.cursors[state.page];
    var page = state.page;
    getData('events', '/events', params).then(function (data) {
      renderEvents(data || {}, page, query(tableParams()));
    }, function (err) {
      $('#events-body').textContent = '';
      $('#page-prev').disabled = state.page === 0;
      handleFailure(el, err);
    });
  }

  function cell(tr, cls, text, title) {
    var td = document.createElement('td');
    if (cls) td.className = cls;
    td.textContent = text;
    if (title) td.title = title;
    tr.appendChild(td);
    return td;
  }

  function renderEvents(data, page, filterQuery) {
    var el = $('#events-card');
    var body = $('#events-body');
    body.textContent = '';
    var events = Array.isArray(data.events) ? data.events : [];
    events.forEach(function (e) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-id', e.id);
      cell(tr, 'ts', zoneTime(e.ts), e.ts);
      cell(tr, 'ev', e.event);
      var src = cell(tr, 'source', '');
      var chip = document.createElement('span');
      chip.className = 'src';
      chip.textContent = e.source;
      src.appendChild(chip);
      cell(tr, 'user', e.user_id || '—', e.user_id);
      cell(tr, 'ip col-ip', e.ip || '—');
      cell(tr, 'req col-req', e.request_id || '—', e.request_id);
      var props = e.props && typeof e.props === 'object' ? JSON.stringify(e.props) : '';
      var pc = cell(tr, 'props col-props', '');
      var code = document.createElement('code');
      code.textContent = props && props !== '{}' ? props : '—';
      if (props) code.title = props;
      pc.appendChild(code);
      body.appendChild(tr);
    });
    state.nextCursor = data.has_more && data.next_cursor ? data.next_cursor : null;
    var empty = $('.widget-empty', el);
    empty.textContent = state.filters.event || state.filters.source
      ? 'No events match these filters in this range.' : 'No events in this range.';
    empty.hidden = events.length > 0 || page > 0;
    $('.pager', el).hidden = events.length === 0 && page === 0;
    var first = page * PAGE_SIZE + 1;
    $('#page-info').textContent = events.length
      ? 'Page ' + (page + 1) + ' · ' + numberFmt.format(first) + '–' + numberFmt.format(first + events.length - 1)
      : (page > 0 ? 'Page ' + (page + 1) + ' · no more events' : 'No events');
    $('#page-prev').disabled = page === 0;
    $('#page-next').disabled = !state.nextCursor;
    el.setAttribute('data-page', String(page + 1));
    el.setAttribute('data-query', filterQuery);
    setState(el, events.length || page > 0 ? 'ready' : 'empty');
  }

  function onNext() {
    if (!state.nextCursor) return;
    state.cursors = state.cursors.slice(0, state.page + 1);
    state.cursors.push(state.nextCursor);
    state.page += 1;
    loadEvents();
  }

  function onPrev() {
    if (state.page === 0) return;
    state.page -= 1;
    loadEvents();
  }

  function onFilterChange() {
    state.filters.event = $('#filter-event').value;
    state.filters.source = $('#filter-source').value;
    resetPages();
    loadEvents();
  }

  // ---------------------------------------------------------------- export

  function filenameFrom(res) {
    var cd = res.headers.get('Content-Disposition') || '';
    var m = /filename="?([^";]+)"?/i.exec(cd);
    return m ? m[1] : 'analytics-export.csv';
  }

  function onExport() {
    var button = $('#export');
    var status = $('#export-status');
    button.disabled = true;
    button.textContent = 'Exporting…';
    status.hidden = true;
    var filename = '';
    var limit = '';
    var truncated = false;
    var params = tableParams();
    params.bom = 'true'; // a download from here is opened in a spreadsheet: Excel needs the BOM for UTF-8
    request('export', '/export.csv', params).then(function (res) {
      filename = filenameFrom(res);
      limit = res.headers.get('X-Export-Row-Limit') || '';
      truncated = res.headers.get('X-Export-Truncated') === 'true';
      return res.blob();
    }).then(function (blob) {
      var url = URL.createObjectURL(blob);
      var a = document.createElement('a');
      a.href = url;
      a.download = filename;
      a.rel = 'noopener';
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(function () { URL.revokeObjectURL(url); }, 30000);
      status.classList.remove('alert', 'alert-error');
      status.classList.add('muted');
      status.textContent = truncated
        ? 'Downloaded ' + filename + ': the newest ' + numberFmt.format(Number(limit)) + ' rows only. More events match; narrow the range or filters, or page through them with the API (X-Export-Next-Cursor).'
        : 'Downloaded ' + filename + ': every matching event.';
      status.hidden = false;
    }).catch(function (err) {
      if (err && err.name === 'AbortError') return;
      if (err instanceof ApiError && err.status === 401) { handleFailure($('#events-card'), err); return; }
      status.classList.remove('muted');
      status.classList.add('alert', 'alert-error');
      status.textContent = 'Export failed: ' + messageFor(err);
      status.hidden = false;
    }).then(function () {
      button.disabled = false;
      button.textContent = 'Export CSV';
    });
  }

  // ---------------------------------------------------------------- wiring

  function loadWidgets() {
    resetPages();
    loadKPIs();
    loadChart();
    loadQuotas();
    loadEvents();
  }

  function refresh() {
    loadNames();
    loadWidgets();
  }

  function start() {
    $('#signin-form').addEventListener('submit', onSignin);
    $('#signout').addEventListener('click', function () { signOut(''); });
    $('.segmented').addEventListener('click', onRangeClick);
    $('#custom-range').addEventListener('submit', onCustomRange);
    $('#refresh').addEventListener('click', refresh);
    $('#metric-options').addEventListener('change', onMetricToggle);
    $('#filter-event').addEventListener('change', onFilterChange);
    $('#filter-source').addEventListener('change', onFilterChange);
    $('#event-filters').addEventListener('submit', function (ev) { ev.preventDefault(); });
    $('#page-next').addEventListener('click', onNext);
    $('#page-prev').addEventListener('click', onPrev);
    $('#export').addEventListener('click', onExport);
    window.addEventListener('resize', onResize);
    document.addEventListener('click', function (ev) {
      var picker = $('#metric-picker');
      if (picker.open && !picker.contains(ev.target)) picker.open = false;
    });
    document.addEventListener('keydown', function (ev) {
      if (ev.key === 'Escape') $('#metric-picker').open = false;
    });

    state.session = loadSession();
    if (!state.session) {
      showSignin('');
      return;
    }
    showApp();
    refresh();
  }

  if (typeof uPlot === 'undefined') {
    document.body.textContent = 'The dashboard could not load its chart library. Reload the page.';
    return;
  }
  start();
})();
