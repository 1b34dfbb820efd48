-- What the controls and alternatives tests share: the arguments, the checks and their summary, the
-- expected suggestion from `phi-lsp complete`, a second Neovim over RPC with the plugin set up
-- (the keys the test presses spelled out), attached and with the model ready, and readers of the
-- buffer and the ghost text. Each test calls `start(name, keys)` and drives the child itself.

local repo = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h:h:h')
local M = {}

--- `name`: the test file's name (its label and usage); `keys`: the phi_lsp.setup() keys it presses.
function M.start(name, keys)
  local usage = ('usage: %s PHI_LSP_BIN MODEL_DIR [auto|native|plugin]'):format(name)
  local bin = vim.fn.fnamemodify(assert(arg[1], usage), ':p')
  local model = vim.fn.fnamemodify(assert(arg[2], usage), ':p'):gsub('/$', '')
  local mode = arg[3] or 'auto'
  local plugin_dir = repo .. '/editors/nvim'
  local label = ('nvim %s %s/%s'):format(tostring(vim.version()), name:gsub('^test_', ''):gsub('%.lua$', ''), mode)
  local growing = vim.json.decode(table.concat(vim.fn.readfile(repo .. '/tests/editors/growing.json'), '\n'))
  local typed = growing.text

  local passed, failed = 0, 0
  local function say(line)
    io.stdout:write(line, '\n')
  end
  local function check(ok, what, detail)
    if ok then
      passed = passed + 1
      say(('ok - %s: %s'):format(label, what))
    else
      failed = failed + 1
      say(('not ok - %s: %s%s'):format(label, what, detail and ('\n    ' .. detail:gsub('\n', '\n    ')) or ''))
    end
    return ok
  end

  local tmp = vim.fn.tempname()
  vim.fn.mkdir(tmp, 'p')
  local file = ('%s/%s.py'):format(tmp, name:gsub('^test_', ''):gsub('%.lua$', ''))
  vim.fn.writefile({}, file)

  -- The expected value, from the one-shot CLI with the same settings.
  local function cli_suggestion(text)
    vim.fn.writefile(vim.split(text, '\n'), tmp .. '/expected.py')
    local lines = vim.split(text, '\n')
    local cli = vim
      .system({ bin, 'complete', tmp .. '/expected.py', '--model', model, '--line', tostring(#lines - 1),
        '--character', tostring(#lines[#lines]), '--max-new-tokens', tostring(growing.maxNewTokens),
        '--deadline-ms', '60000', '--json' }, { text = true })
      :wait(120000)
    return cli.code == 0 and vim.json.decode(cli.stdout).text or nil, cli
  end
  local expected, cli = cli_suggestion(typed)
  local function finish_early()
    say(('%s: %d passed, %d failed'):format(label, passed, failed))
    os.exit(failed == 0 and 0 or 1)
  end
  if not check(expected and expected:find('\n') ~= nil, 'phi-lsp complete gives a suggestion of several lines there',
      ('exit %s\n%s%s'):format(cli.code, cli.stdout, cli.stderr)) then
    finish_early()
  end

  local child = vim.fn.jobstart({ vim.v.progpath, '--embed', '--headless', '--clean', '-n', '-i', 'NONE' }, {
    rpc = true,
    env = { XDG_STATE_HOME = tmp .. '/state', XDG_CONFIG_HOME = tmp .. '/config', XDG_DATA_HOME = tmp .. '/data' },
  })
  assert(child > 0, 'could not start ' .. vim.v.progpath)

  local function lua(code, ...)
    return vim.rpcrequest(child, 'nvim_exec_lua', code, { ... })
  end
  local function input(keys)
    vim.rpcrequest(child, 'nvim_input', keys)
  end
  local function wait_for(timeout_ms, fn, interval)
    local value
    local ok = vim.wait(timeout_ms, function()
      value = fn()
      return value ~= nil and value ~= false and value ~= vim.NIL
    end, interval or 20)
    return ok and value or nil
  end
  local function finish()
    pcall(vim.rpcrequest, child, 'nvim_command', 'qall!')
    vim.fn.jobwait({ child }, 5000)
    pcall(vim.fn.jobstop, child)
    finish_early()
  end

  lua([[
    local plugin_dir, bin, model, mode, max_new_tokens, keys = ...
    vim.opt.runtimepath:prepend(plugin_dir)
    vim.cmd.runtime('plugin/phi_lsp.lua')
    require('phi_lsp').setup(vim.tbl_extend('force', {
      cmd = { bin, '--stdio' },
      settings = { model = model, maxNewTokens = max_new_tokens, deadlineMs = 60000 },
      inline = mode,
    }, keys))
    vim.o.statusline = "%{v:lua.require'phi_lsp'.statusline()}"
  ]], plugin_dir, bin, model, mode, growing.maxNewTokens, keys)

  local kind = lua([[return require('phi_lsp').inline_kind()]])
  label = ('%s (%s ghost text)'):format(label, kind)
  lua('vim.cmd.edit(...)', file)
  local attached = wait_for(20000, function()
    return lua([[local c = require('phi_lsp').clients(0)[1]; return c and c.initialized and c.id or nil]])
  end)
  if not check(attached ~= nil, 'phi_lsp attaches to a Python buffer') then
    finish()
  end
  local function status()
    return lua([[return require('phi_lsp').status(nil, 2000)]])
  end
  local ready = wait_for(60000, function()
    local s = status()
    return type(s) == 'table' and s.state ~= 'loading' and s or nil
  end)
  if not check(ready and ready.state == 'ready', 'the model is ready', vim.inspect(ready)) then
    finish()
  end

  local function buffer_text()
    return lua([[return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\n')]])
  end
  local ghost_reader = [=[
    local kind = ...
    local ns = vim.api.nvim_get_namespaces()[kind == 'native' and 'nvim.lsp.inline_completion' or 'phi_lsp.ghost']
    local marks = ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
    if #marks == 0 then return nil end
    local details = marks[1][4]
    local first = ''
    for _, chunk in ipairs(details.virt_text or {}) do
      first = first .. chunk[1]
    end
    local lines = { first }
    for _, virt_line in ipairs(details.virt_lines or {}) do
      local text = ''
      for _, chunk in ipairs(virt_line) do
        text = text .. chunk[1]
      end
      lines[#lines + 1] = text
    end
    return table.concat(lines, '\n')
  ]=]
  local function ghost()
    local g = lua(ghost_reader, kind)
    return type(g) == 'string' and g or nil
  end
  local function ghost_is(text)
    return function()
      return ghost() == text or nil
    end
  end
  local function next_part(rest, part)
    return lua([[return require('phi_lsp').next_part(...)]], rest, part)
  end
  return {
    repo = repo,
    bin = bin,
    model = model,
    mode = mode,
    growing = growing,
    typed = typed,
    tmp = tmp,
    file = file,
    expected = expected,
    check = check,
    say = say,
    lua = lua,
    input = input,
    wait_for = wait_for,
    finish = finish,
    status = status,
    ready = ready,
    buffer_text = buffer_text,
    ghost = ghost,
    ghost_is = ghost_is,
    next_part = next_part,
    cli_suggestion = cli_suggestion,
    kind = kind,
  }
end

return M
